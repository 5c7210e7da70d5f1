{{/* Names, labels and small shared pieces of the cleanplate chart. */}}

{{- define "cleanplate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; component names add "-gateway" / "-triton", so keep room for them. */}}
{{- define "cleanplate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cleanplate.gateway.fullname" -}}
{{- printf "%s-gateway" (include "cleanplate.fullname" .) }}
{{- end }}

{{- define "cleanplate.triton.fullname" -}}
{{- printf "%s-triton" (include "cleanplate.fullname" .) }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). Never change these on upgrade. */}}
{{- define "cleanplate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cleanplate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cleanplate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cleanplate.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cleanplate
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* An image reference from (dict "image" .Values.x.image "root" $ "component" "x"): digest wins over tag; tag defaults to appVersion. */}}
{{- define "cleanplate.image" -}}
{{- $repo := required (printf "%s.image.repository is required" .component) .image.repository }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (.image.tag | default .root.Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/* host:port the gateway's triton engine dials: the Triton Service, on the port of the chosen protocol. */}}
{{- define "cleanplate.triton.address" -}}
{{- $port := ternary .Values.triton.ports.grpc .Values.triton.ports.http (eq .Values.triton.protocol "grpc") }}
{{- printf "%s:%v" (include "cleanplate.triton.fullname" .) $port }}
{{- end }}

{{/* The Secret holding the API keys, or "" when the gateway runs without authentication. */}}
{{- define "cleanplate.gateway.apiKeysSecret" -}}
{{- if .Values.gateway.auth.existingSecret }}
{{- .Values.gateway.auth.existingSecret }}
{{- else if .Values.gateway.auth.apiKeys }}
{{- printf "%s-api-keys" (include "cleanplate.gateway.fullname" .) }}
{{- end }}
{{- end }}

{{/* The gateway's settings file: the user's config plus what the chart decides (engine, Triton address, bundle path). */}}
{{- define "cleanplate.gateway.config" -}}
{{- $cfg := deepCopy .Values.gateway.config }}
{{- range $key := list "host" "port" "api_keys" }}
{{- if hasKey $cfg $key }}
{{- fail (printf "gateway.config.%s is set by the chart (gateway.containerPort, gateway.auth), not here" $key) }}
{{- end }}
{{- end }}
{{- if .Values.triton.enabled }}
{{- if and (hasKey $cfg "engine") (ne (toString $cfg.engine) "triton") }}
{{- fail (printf "gateway.config.engine is %q but triton.enabled is true: the gateway must use the triton engine" (toString $cfg.engine)) }}
{{- end }}
{{- $_ := set $cfg "engine" "triton" }}
{{- $_ := set $cfg "triton_url" (include "cleanplate.triton.address" .) }}
{{- $_ := set $cfg "triton_protocol" .Values.triton.protocol }}
{{- else if not (hasKey $cfg "engine") }}
{{- $_ := set $cfg "engine" "torch" }}
{{- end }}
{{- if .Values.gateway.bundle.claimName }}
{{- $_ := set $cfg "bundle" "/var/lib/cleanplate/bundle" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Default spread: prefer one pod per node. */}}
{{- define "cleanplate.topologySpread" -}}
{{- if .constraints }}
{{- toYaml .constraints }}
{{- else -}}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "cleanplate.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}
