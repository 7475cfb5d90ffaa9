{{- define "kvstore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvstore.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvstore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvstore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvstore.labels" -}}
{{ include "kvstore.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kvstore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvstore.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvstore.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if and (eq .Values.image.variant "cuda") (not .Values.image.tag) -}}{{- $tag = printf "%s-cuda" $tag -}}{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The pod's memory: the DRAM arena, the daemon's own, and with tenants the same-host windows. */}}
{{- define "kvstore.memory" -}}
{{- $gi := add .Values.dram.sizeGi .Values.memoryOverheadGi -}}
{{- if and .Values.tenants.enabled .Values.sameHost.enabled -}}{{- $gi = add $gi .Values.sameHost.windowBudgetGi -}}{{- end -}}
{{- printf "%dGi" $gi -}}
{{- end -}}

{{- define "kvstore.tlsSecret" -}}
{{- if .Values.tls.certManager.enabled -}}{{ include "kvstore.fullname" . }}-tls{{- else -}}{{ .Values.tls.secretName }}{{- end -}}
{{- end -}}

{{- define "kvstore.peersHost" -}}
{{ include "kvstore.fullname" . }}-peers.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end -}}

{{/* The client flags of `kvstore health` with TLS on (the probes connect to 127.0.0.1). */}}
{{- define "kvstore.healthArgs" -}}
- kvstore
- health
- --target
- 127.0.0.1:{{ .Values.port }}
{{- if .Values.tls.enabled }}
- --tls-ca
- /etc/kvstore/tls/ca.crt
- --tls-cert
- /etc/kvstore/tls/tls.crt
- --tls-key
- /etc/kvstore/tls/tls.key
- --tls-server-name
- {{ .Values.tls.probeServerName }}
{{- end }}
{{- end -}}
