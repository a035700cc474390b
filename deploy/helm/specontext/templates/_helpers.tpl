{{- define "specontext.name" -}}{{ .Chart.Name }}{{- end -}}
{{- define "specontext.fullname" -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "specontext.labels" -}}
app.kubernetes.io/name: {{ include "specontext.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "specontext.selector" -}}
app.kubernetes.io/name: {{ include "specontext.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
