{{- define "apirouter.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "apirouter.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "apirouter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{ include "apirouter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "apirouter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "apirouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "apirouter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "apirouter.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The router's config file: server settings, backends, models, keys, orgs, budgets. */}}
{{- define "apirouter.routerConfig" -}}
{{- $c := .Values.config -}}
server:
{{ toYaml $c.server | indent 2 }}
backends:
{{ toYaml $c.backends | indent 2 }}
models:
{{ toYaml $c.models | indent 2 }}
{{- if $c.keys }}
keys:
{{ toYaml $c.keys | indent 2 }}
{{- end }}
{{- if $c.orgs }}
orgs:
{{ toYaml $c.orgs | indent 2 }}
{{- end }}
{{- if $c.budgets }}
budgets:
{{ toYaml $c.budgets | indent 2 }}
{{- end }}
{{- end -}}

{{/* /dev/shm: two table slots, one usage ring per worker slot, headroom; in MiB. */}}
{{- define "apirouter.shmMiB" -}}
{{- $s := .Values.config.server -}}
{{- $bytes := add (mul 2 (int64 $s.table_slot_bytes)) (mul (int64 .Values.shm.ringSlots) (int64 $s.usage_ring_bytes)) -}}
{{- add (div (add $bytes 1048575) 1048576) (int64 .Values.shm.headroomMiB) -}}
{{- end -}}

{{- define "apirouter.port" -}}
{{- splitList ":" .Values.config.server.bind | last -}}
{{- end -}}
