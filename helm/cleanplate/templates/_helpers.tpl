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
{{- range $key := list "memory_limit_mib" "memory_reserve_mib" "memory_budget_mib" }}
{{- if hasKey $cfg $key }}
{{- fail (printf "gateway.config.%s is set by the chart (gateway.resources.limits.memory, gateway.memoryReserveMiB, gateway.memoryBudgetMiB), not here" $key) }}
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

{{/* A memory quantity in MiB, rounded up as the kubelet rounds a Downward API resourceFieldRef with divisor 1Mi:
     (dict "quantity" "4Gi" "name" "gateway.resources.limits.memory"). A string with the suffix Ki, Mi, Gi, Ti,
     k, M, G, T or m (milli), or a plain number of bytes; any other form fails the render rather than guess.
     sprig's mulf/divf compute in decimal, so "1.5Gi" or "2G" convert exactly. */}}
{{- define "cleanplate.mebibytes" -}}
{{- $q := .quantity }}
{{- $bytes := 0 }}
{{- if kindIs "string" $q }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T|m)?$" $q) }}
{{- fail (printf "%s is %q: write a number with Ki, Mi, Gi or Ti (or k, M, G, T), e.g. 4Gi" .name $q) }}
{{- end }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $factors := dict "" 1 "m" 0.001 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- $bytes = mulf $number (get $factors (trimPrefix $number $q)) }}
{{- else if or (kindIs "float64" $q) (kindIs "int" $q) (kindIs "int64" $q) }}
{{- $bytes = $q }}
{{- else }}
{{- fail (printf "%s is %v: write a quantity such as 4Gi" .name $q) }}
{{- end }}
{{- divf $bytes 1048576 | ceil | int64 }}
{{- end }}

{{/* The gateway container's memory limit in MiB, as CLEANPLATE_MEMORY_LIMIT_MIB will read it in the pod; fails
     when none is set (the Downward API would then give the node's allocatable memory, not a limit). */}}
{{- define "cleanplate.gateway.memoryLimitMiB" -}}
{{- $memory := get (.Values.gateway.resources.limits | default dict) "memory" }}
{{- if or (kindIs "invalid" $memory) (eq (toString $memory) "") }}
{{- fail "gateway.resources.limits.memory is required: the gateway's memory budget follows it (CLEANPLATE_MEMORY_LIMIT_MIB, through the Downward API), and without a limit Kubernetes would report the node's whole allocatable memory" }}
{{- end }}
{{- include "cleanplate.mebibytes" (dict "quantity" $memory "name" "gateway.resources.limits.memory") }}
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

{{- define "cleanplate.rayjob.fullname" -}}
{{- printf "%s-batch" (include "cleanplate.fullname" .) }}
{{- end }}

{{/* The Secret holding the object-store keys of the RayJob, or "" when none is given (node role, workload identity). */}}
{{- define "cleanplate.rayjob.storageSecret" -}}
{{- $s := .Values.rayJob.objectStorage }}
{{- if $s.existingSecret }}
{{- $s.existingSecret }}
{{- else if or $s.accessKeyId $s.secretAccessKey $s.endpointUrl $s.region }}
{{- printf "%s-object-storage" (include "cleanplate.rayjob.fullname" .) }}
{{- end }}
{{- end }}

{{/* A Ray node container of the RayJob: (dict "root" $ "name" "ray-head" "resources" {...}). */}}
{{- define "cleanplate.rayjob.container" -}}
{{- $r := .root.Values.rayJob }}
{{- $secret := include "cleanplate.rayjob.storageSecret" .root -}}
- name: {{ .name }}
  image: {{ include "cleanplate.image" (dict "image" $r.image "root" .root "component" "rayJob") | quote }}
  imagePullPolicy: {{ $r.image.pullPolicy }}
  {{- if .ports }}
  ports:
    - name: gcs-server
      containerPort: 6379
    - name: dashboard
      containerPort: 8265
    - name: client
      containerPort: 10001
  {{- end }}
  {{- if $secret }}
  # s3fs (botocore) reads the keys, the endpoint and the region from the environment.
  env:
    {{- range $env, $optional := dict "AWS_ACCESS_KEY_ID" false "AWS_SECRET_ACCESS_KEY" false "AWS_ENDPOINT_URL" true "AWS_REGION" true }}
    - name: {{ $env }}
      valueFrom:
        secretKeyRef:
          name: {{ $secret }}
          key: {{ $env }}
          {{- if $optional }}
          optional: true
          {{- end }}
    {{- end }}
  {{- end }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  securityContext:
    allowPrivilegeEscalation: false
    capabilities:
      drop: ["ALL"]
  volumeMounts:
    - name: dshm
      mountPath: /dev/shm
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* The Ray node pod spec around one container: (dict "root" $ "container" "..." "nodeSelector" {...} "tolerations" [...]). */}}
{{- define "cleanplate.rayjob.podSpec" -}}
{{- $r := .root.Values.rayJob -}}
{{- with $r.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with $r.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
containers:
  {{- .container | nindent 2 }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $r.shmSizeLimit }}
  - name: tmp
    emptyDir: {}
{{- end }}
