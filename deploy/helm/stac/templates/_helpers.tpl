{{/* Names and labels shared by every object of the chart. */}}
{{- define "stac.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stac.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "stac.tritonSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: triton
{{- end -}}

{{- define "stac.proxySelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: proxy
{{- end -}}

{{/* The Secret holding the admin key: adminKey.existingSecret, or the chart's own from adminKey.value.
Neither given fails the render, as compose refuses to start without STAC_ADMIN_KEY. */}}
{{- define "stac.adminKeySecretName" -}}
{{- if .Values.adminKey.existingSecret -}}
{{- .Values.adminKey.existingSecret -}}
{{- else if .Values.adminKey.value -}}
{{- printf "%s-admin-key" (include "stac.fullname" .) -}}
{{- else -}}
{{- fail "adminKey: set adminKey.existingSecret (a Secret holding the key under adminKey.secretKey) or adminKey.value (a long random secret, e.g. openssl rand -hex 24); docs/security.md" -}}
{{- end -}}
{{- end -}}
