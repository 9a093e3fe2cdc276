{{/* Names, labels and derived values shared by the templates. */}}

{{- define "kernel-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kernel-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kernel-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kernel-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kernel-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kernel-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kernel-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kernel-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace of kernel pods in shared mode. */}}
{{- define "kernel-gateway.kernelNamespace" -}}
{{- default .Release.Namespace .Values.kernels.namespace }}
{{- end }}

{{/* The value of the kernel pods' kernel_gateway.instance label (GATEWAY_INSTANCE_NAME). */}}
{{- define "kernel-gateway.instanceName" -}}
{{- default (include "kernel-gateway.fullname" .) .Values.gateway.instanceName }}
{{- end }}

{{/* "true" when the gateway must see kernel pods outside one namespace (needs a ClusterRole). */}}
{{- define "kernel-gateway.clusterScoped" -}}
{{- if or (eq .Values.kernels.namespaceMode "per-kernel") (gt (len .Values.kernels.allowedNamespaces) 0) }}true{{ end }}
{{- end }}

{{- define "kernel-gateway.tokenSecretName" -}}
{{- default (printf "%s-token" (include "kernel-gateway.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "kernel-gateway.tokenSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* The Secret holding the kernel store's key: kernelStore.keySecret, else the one the chart makes. */}}
{{- define "kernel-gateway.storeKeySecretName" -}}
{{- default (printf "%s-store-key" (include "kernel-gateway.fullname" .)) .Values.kernelStore.keySecret }}
{{- end }}

{{- define "kernel-gateway.storeKeySecretKey" -}}
{{- if .Values.kernelStore.keySecret }}{{ .Values.kernelStore.keySecretKey }}{{ else }}key{{ end }}
{{- end }}

{{/* GATEWAY_KERNELS_ON_STOP: kernels.onStop, else keep when records outlive the pod (Kubernetes store). */}}
{{- define "kernel-gateway.onStop" -}}
{{- default (ternary "keep" "shutdown" (eq .Values.kernelStore.kind "kubernetes")) .Values.kernels.onStop }}
{{- end }}

{{/* The probes' path prefix: baseUrl with exactly one slash at each end. */}}
{{- define "kernel-gateway.basePath" -}}
{{- $trimmed := trimAll "/" .Values.gateway.baseUrl }}
{{- if $trimmed }}/{{ $trimmed }}/{{ else }}/{{ end }}
{{- end }}

{{/* The kernel port range as two numbers: low, high. */}}
{{- define "kernel-gateway.portLow" -}}
{{- index (splitList ".." .Values.gateway.portRange) 0 }}
{{- end }}
{{- define "kernel-gateway.portHigh" -}}
{{- index (splitList ".." .Values.gateway.portRange) 1 }}
{{- end }}
