{{/* Shared names, labels, images, probes and computed settings of the InstGenIE chart. */}}

{{- define "instgenie.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or just <release> when it already contains the chart name; 63 characters at most. */}}
{{- define "instgenie.fullname" -}}
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

{{/* A component's resource name: <fullname>-<component>. Usage: include "instgenie.component" (list . "gateway") */}}
{{- define "instgenie.component" -}}
{{- $ctx := index . 0 -}}
{{- printf "%s-%s" (include "instgenie.fullname" $ctx | trunc 50 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{- define "instgenie.selectorLabels" -}}
app.kubernetes.io/name: {{ include "instgenie.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "instgenie.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "instgenie.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: instgenie
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component. Usage: include "instgenie.componentSelectorLabels" (list . "worker") */}}
{{- define "instgenie.componentSelectorLabels" -}}
{{ include "instgenie.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "instgenie.componentLabels" -}}
{{ include "instgenie.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "instgenie.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "instgenie.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag of the CPU image (gateway, scheduler, test pod). */}}
{{- define "instgenie.cpuImage" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) -}}
{{- end -}}

{{- define "instgenie.schedulerImage" -}}
{{- $repo := default .Values.gateway.image.repository .Values.scheduler.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.gateway.image.tag) .Values.scheduler.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "instgenie.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) -}}
{{- end -}}

{{/* host:port the gateways and workers dial for the scheduler (its Service). */}}
{{- define "instgenie.schedulerAddress" -}}
{{- printf "%s:%d" (include "instgenie.component" (list . "scheduler")) (int .Values.scheduler.port) -}}
{{- end -}}

{{- define "instgenie.gatewayAddress" -}}
{{- printf "%s.%s.svc:%d" (include "instgenie.component" (list . "gateway")) .Release.Namespace (int .Values.gateway.port) -}}
{{- end -}}

{{/* The S3 endpoint: the bundled MinIO's Service, else the external endpoint (required then). */}}
{{- define "instgenie.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s:%d" (include "instgenie.component" (list . "minio")) (int .Values.minio.port) -}}
{{- else -}}
{{- required "objectStore.endpoint is required when minio.enabled is false (host:port of your S3 service)" .Values.objectStore.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "instgenie.s3SecretName" -}}
{{- default (include "instgenie.component" (list . "s3")) .Values.objectStore.credentials.existingSecret -}}
{{- end -}}

{{- define "instgenie.apiKeysSecretName" -}}
{{- default (include "instgenie.component" (list . "api-keys")) .Values.gateway.apiKeys.existingSecret -}}
{{- end -}}

{{- define "instgenie.smokeSecretName" -}}
{{- default (include "instgenie.component" (list . "smoke-key")) .Values.smokeTest.existingSecret -}}
{{- end -}}

{{/* The smoke test's key is added to the gateway as its own tenant unless it is one of the user's keys. */}}
{{- define "instgenie.smokeTenantInjected" -}}
{{- if and .Values.smokeTest.enabled (not .Values.smokeTest.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* The object store's environment: endpoint, bucket, https, credentials from the Secret. */}}
{{- define "instgenie.s3Env" -}}
- name: INSTGENIE_S3_ENDPOINT
  value: {{ include "instgenie.s3Endpoint" . | quote }}
- name: INSTGENIE_S3_BUCKET
  value: {{ .Values.objectStore.bucket | quote }}
- name: INSTGENIE_S3_SECURE
  value: {{ and (not .Values.minio.enabled) .Values.objectStore.secure | quote }}
- name: INSTGENIE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "instgenie.s3SecretName" . }}
      key: {{ .Values.objectStore.credentials.accessKeyKey }}
- name: INSTGENIE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "instgenie.s3SecretName" . }}
      key: {{ .Values.objectStore.credentials.secretKeyKey }}
{{- end -}}

{{/* Settings every InstGenIE server shares: listen on all addresses of the pod, log level. */}}
{{- define "instgenie.serverEnv" -}}
{{- $ctx := index . 0 -}}
- name: INSTGENIE_LISTEN
  value: {{ printf "0.0.0.0:%d" (int (index . 1)) | quote }}
- name: INSTGENIE_LOG_LEVEL
  value: {{ $ctx.Values.logLevel | quote }}
{{- if $ctx.Values.metrics.enabled }}
- name: INSTGENIE_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int $ctx.Values.metrics.port) | quote }}
{{- end }}
{{- with $ctx.Values.tracing.otlpEndpoint }}
- name: INSTGENIE_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $ctx.Values.tracing.sampleRatio | toString | quote }}
{{- end }}
{{- end -}}

{{/* Startup, readiness and liveness probes on grpc.health.v1. Usage: include "instgenie.probes" (list .Values.gateway.probes port) */}}
{{- define "instgenie.probes" -}}
{{- $probes := index . 0 -}}
{{- $port := int (index . 1) -}}
{{- $out := dict -}}
{{- range $kind := list "startup" "readiness" "liveness" -}}
{{- $p := index $probes $kind -}}
{{- $_ := set $out (printf "%sProbe" $kind) (dict "grpc" (dict "port" $port "service" $p.service) "periodSeconds" $p.periodSeconds "failureThreshold" $p.failureThreshold "timeoutSeconds" $p.timeoutSeconds) -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* A Kubernetes quantity ("8Gi", "512Mi", "1.5G", "1000") in bytes, as an integer. */}}
{{- define "instgenie.bytes" -}}
{{- $q := toString . -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- if not $number -}}
{{- fail (printf "cannot read the memory quantity %q" $q) -}}
{{- end -}}
{{- $suffix := trimPrefix $number $q -}}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- if not (hasKey $units $suffix) -}}
{{- fail (printf "cannot read the memory quantity %q (use a suffix of Ki, Mi, Gi, Ti, k, M, G or T)" $q) -}}
{{- end -}}
{{- mulf (float64 $number) (index $units $suffix) | int64 -}}
{{- end -}}

{{/* INSTGENIE_HOST_CACHE_BYTES: a fixed budget, or a share of the worker's memory limit. */}}
{{- define "instgenie.hostCacheBytes" -}}
{{- $limit := dig "limits" "memory" "" .Values.worker.resources -}}
{{- if not $limit -}}
{{- fail "worker.resources.limits.memory is required: the host cache budget (worker.hostCache) is derived from it" -}}
{{- end -}}
{{- $limitBytes := include "instgenie.bytes" $limit | int64 -}}
{{- $bytes := int64 .Values.worker.hostCache.bytes -}}
{{- if gt $bytes 0 -}}
{{- if ge $bytes $limitBytes -}}
{{- fail (printf "worker.hostCache.bytes (%d) must be below worker.resources.limits.memory (%s = %d bytes)" $bytes $limit $limitBytes) -}}
{{- end -}}
{{- $bytes -}}
{{- else -}}
{{- div (mul $limitBytes (int64 .Values.worker.hostCache.memoryLimitPercent)) 100 -}}
{{- end -}}
{{- end -}}

{{/* A random secret value that survives upgrades: the one already stored in the Secret, else a new one. */}}
{{- define "instgenie.keptRandom" -}}
{{- $ctx := index . 0 -}}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace (index . 1) -}}
{{- $stored := dig "data" (index . 2) "" ($existing | default dict) -}}
{{- if $stored -}}
{{- b64dec $stored -}}
{{- else -}}
{{- randAlphaNum (int (index . 3)) -}}
{{- end -}}
{{- end -}}
