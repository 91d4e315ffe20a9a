{{/* Names, labels and small computed values shared by the templates. */}}

{{- define "spotrag.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-spotrag", or the release name alone when it already says spotrag. */}}
{{- define "spotrag.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "spotrag.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "spotrag.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spotrag
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "operator"). */}}
{{- define "spotrag.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spotrag.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "spotrag.componentLabels" -}}
{{ include "spotrag.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "spotrag.operator.fullname" -}}
{{- printf "%s-operator" (include "spotrag.fullname" .) -}}
{{- end -}}

{{- define "spotrag.nodeAgent.fullname" -}}
{{- printf "%s-node-agent" (include "spotrag.fullname" .) -}}
{{- end -}}

{{- define "spotrag.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "spotrag.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "spotrag.nodeAgent.serviceAccountName" -}}
{{- if .Values.nodeAgent.serviceAccount.create -}}
{{- default (include "spotrag.nodeAgent.fullname" .) .Values.nodeAgent.serviceAccount.name -}}
{{- else -}}
{{- .Values.nodeAgent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "repository:tag", the tag defaulting to the chart's appVersion. */}}
{{- define "spotrag.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) -}}
{{- end -}}

{{/* Namespaces the operator watches, as a JSON list (empty: all of them). */}}
{{- define "spotrag.watchNamespaces" -}}
{{- toJson (.Values.operator.watchNamespaces | default list) -}}
{{- end -}}

{{/* Namespaces where RAGDeployments live, for the NetworkPolicies (JSON list). */}}
{{- define "spotrag.networkPolicyNamespaces" -}}
{{- toJson (.Values.networkPolicy.namespaces | default .Values.operator.watchNamespaces | default list) -}}
{{- end -}}

{{/* Namespaces the monitors scrape (JSON list; empty: any namespace). */}}
{{- define "spotrag.monitoringNamespaces" -}}
{{- toJson (.Values.monitoring.namespaces | default .Values.operator.watchNamespaces | default list) -}}
{{- end -}}

{{/* Settings that no schema can reject on its own: fail with the fields named. */}}
{{- define "spotrag.validate" -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.peering.enabled) -}}
{{- fail (printf "operator.replicas=%d needs operator.peering.enabled=true: without peering every replica would reconcile the same RAGDeployments at once" (int .Values.operator.replicas)) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not (.Values.networkPolicy.namespaces | default .Values.operator.watchNamespaces)) -}}
{{- fail "networkPolicy.enabled=true needs networkPolicy.namespaces (or operator.watchNamespaces): NetworkPolicies are namespaced, so list the namespaces where RAGDeployments live" -}}
{{- end -}}
{{- end -}}

{{- define "spotrag.frontDoor.fullname" -}}
{{- printf "%s-front-door" (include "spotrag.fullname" .) -}}
{{- end -}}

{{- define "spotrag.frontDoor.serviceAccountName" -}}
{{- if .Values.frontDoor.serviceAccount.create -}}
{{- default (include "spotrag.frontDoor.fullname" .) .Values.frontDoor.serviceAccount.name -}}
{{- else -}}
{{- .Values.frontDoor.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the front door may do (docs/front-door.md). */}}
{{- define "spotrag.frontDoor.rules" -}}
- apiGroups: ["spotrag.io"]
  resources: ["ragdeployments", "modelroutes"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["spotrag.io"]
  resources: ["modelroutes/status"]
  verbs: ["get", "patch"]
{{- if eq .Values.frontDoor.address "endpointslices" }}
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- end -}}
