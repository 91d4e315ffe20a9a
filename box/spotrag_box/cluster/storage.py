"""A volume provisioner: every PersistentVolumeClaim is Bound to a folder
on this machine (the folder the cluster was given for it, else one under
its workdir), which is what the kubelet mounts for pods using the claim."""

from __future__ import annotations

from spotrag_runtime.kube import AsyncKube, Informer, KubeError, object_path

from .containers import LocalRuntime
from .controller import Controller

PATH_ANNOTATION = "box.spotrag.io/host-path"


class VolumeProvisioner(Controller):
    name = "volume-provisioner"

    def __init__(self, client: AsyncKube, claims: Informer, runtime: LocalRuntime, *, resync: float):
        super().__init__(resync=resync)
        self.client = client
        self.claims = claims
        self.runtime = runtime
        claims.subscribe(self.wake)

    async def reconcile(self) -> None:
        for claim in self.claims.items():
            meta = claim["metadata"]
            if (claim.get("status") or {}).get("phase") == "Bound" or meta.get("deletionTimestamp"):
                continue
            folder = self.runtime.claim_path(meta["namespace"], meta["name"])
            spec = claim.get("spec") or {}
            path = object_path("v1", "persistentvolumeclaims", meta["name"], meta["namespace"])
            try:
                await self.client.patch(path, {"metadata": {"annotations": {PATH_ANNOTATION: str(folder)}}})
                await self.client.patch(
                    path + "/status",
                    {
                        "status": {
                            "phase": "Bound",
                            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                            "capacity": {
                                "storage": ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
                            },
                        }
                    },
                )
            except KubeError as error:
                if error.status != 404:
                    raise
