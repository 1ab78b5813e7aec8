{{- define "rag.fullname" -}}{{ printf "%s-rag" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}

{{- define "rag.labels" -}}
app.kubernetes.io/name: rag
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "rag.secretName" -}}
{{- if .Values.secrets.existingSecret -}}{{ .Values.secrets.existingSecret }}{{- else -}}{{ include "rag.fullname" . }}-secrets{{- end -}}
{{- end -}}

{{- define "rag.qdrantUrl" -}}
{{- if .Values.qdrant.deploy -}}http://{{ include "rag.fullname" . }}-qdrant:6333{{- else -}}{{ required "qdrant.url is required when qdrant.deploy is false" .Values.qdrant.url }}{{- end -}}
{{- end -}}

{{/* The environment of API and worker pods: the settings, the Qdrant URL, the secrets. */}}
{{- define "rag.env" -}}
- name: RAG_DATA_DIR
  value: /app/data
- name: RAG_QDRANT_URL
  value: {{ include "rag.qdrantUrl" . | quote }}
{{- range $name, $value := .Values.settings }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
- name: RAG_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "rag.secretName" . }}
      key: RAG_DATABASE_URL
{{- end -}}
