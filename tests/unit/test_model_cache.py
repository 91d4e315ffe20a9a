"""The engine's model cache choice on real folders: a usable node cache is
linked, an unwritable or too-full one is passed over for the pod's own folder
with the reason the operator turns into an Event."""

from __future__ import annotations

from pathlib import Path

from spotrag_runtime.model_cache import GIB, UNUSABLE, cli, prepare


def test_a_usable_node_cache_is_linked_and_says_so(tmp_path: Path) -> None:
    node, pod, link = tmp_path / "node", tmp_path / "pod", tmp_path / "home" / "current"
    choice = prepare(node, pod, link, min_free_bytes=0)
    assert choice.problem is None and link.resolve() == node.resolve()
    (link / "weights").write_text("w")  # what one engine writes, the next on the node finds
    assert (node / "weights").read_text() == "w"
    again = prepare(node, pod, link, min_free_bytes=0)  # a restarted init container
    assert again.problem is None and link.resolve() == node.resolve()


def test_an_unwritable_node_cache_falls_back_to_the_pods_own_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    pod, link = tmp_path / "pod", tmp_path / "home" / "current"
    choice = prepare(blocker / "models", pod, link, min_free_bytes=0)
    assert choice.problem is not None and "cannot be written" in choice.problem
    assert link.resolve() == pod.resolve() and choice.message.startswith(UNUSABLE)


def test_a_full_node_cache_falls_back_and_the_message_says_how_full(tmp_path: Path) -> None:
    message = tmp_path / "termination-log"
    argv = ["prepare", "--node", str(tmp_path / "node"), "--pod", str(tmp_path / "pod")]
    argv += ["--link", str(tmp_path / "current"), "--min-free-gi", str(10**9), "--message-file", str(message)]
    assert cli(argv) == 0  # never blocks the engine
    text = message.read_text()
    assert text.startswith(UNUSABLE) and "GiB free, less than" in text
    assert (tmp_path / "current").resolve() == (tmp_path / "pod").resolve()
    assert GIB == 1 << 30
