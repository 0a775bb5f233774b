{{/*
Shared helpers of the loragate chart: names, labels, images, and the two containers' command
lines (vLLM on 127.0.0.1, the proxy in front of it). tests/test_chart_local.py runs exactly the
command lines rendered here.
*/}}

{{/* Chart name. */}}
{{- define "loragate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or <release> when it already contains the chart name. */}}
{{- define "loragate.fullname" -}}
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

{{/* Chart label value. */}}
{{- define "loragate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the engine pods (never change them after install). */}}
{{- define "loragate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: engine
{{- end }}

{{/* Labels of every resource. */}}
{{- define "loragate.labels" -}}
helm.sh/chart: {{ include "loragate.chart" . }}
{{ include "loragate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loragate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ServiceAccount the pods run as. */}}
{{- define "loragate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loragate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}; the digest wins when set.
Usage: include "loragate.image" (dict "image" .Values.vllm.image "tag" "fallback") */}}
{{- define "loragate.image" -}}
{{- $img := .image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .tag $img.tag) }}
{{- end }}
{{- end }}

{{- define "loragate.vllmImage" -}}
{{- include "loragate.image" (dict "image" .Values.vllm.image "tag" "") }}
{{- end }}

{{- define "loragate.proxyImage" -}}
{{- include "loragate.image" (dict "image" .Values.proxy.image "tag" .Chart.AppVersion) }}
{{- end }}

{{/* URL of vLLM inside the pod (what the proxy forwards to). */}}
{{- define "loragate.upstreamUrl" -}}
{{- printf "http://127.0.0.1:%d" (int .Values.vllm.port) }}
{{- end }}

{{/* Path of the contracts file in both containers. */}}
{{- define "loragate.contractsPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.adapters.mountPath) .Values.adapters.contractsFile }}
{{- end }}

{{/* The model argument of `vllm serve`: a hub repository id, or a folder on the model PVC. */}}
{{- define "loragate.modelArg" -}}
{{- if eq .Values.model.source "pvc" }}
{{- $claim := required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
{{- $path := required "model.pvc.path (the model's folder under model.pvc.mountPath) is required when model.source is pvc" .Values.model.pvc.path }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.pvc.mountPath) $path }}
{{- else }}
{{- required "model.name (a Hugging Face repository id) is required when model.source is hub" .Values.model.name }}
{{- end }}
{{- end }}

{{/* Name clients use for the base model. */}}
{{- define "loragate.servedModelName" -}}
{{- if .Values.vllm.servedModelName }}
{{- .Values.vllm.servedModelName }}
{{- else if eq .Values.model.source "hub" }}
{{- .Values.model.name }}
{{- else }}
{{- fail "vllm.servedModelName is required when model.source is pvc (else clients would have to send the model's file path)" }}
{{- end }}
{{- end }}

{{/* Seconds vLLM drains after SIGTERM (--shutdown-timeout): the value, or the grace period less
the preStop sleep less 10 s. */}}
{{- define "loragate.vllmShutdownTimeout" -}}
{{- if kindIs "invalid" .Values.vllm.shutdownTimeoutSeconds }}
{{- sub (sub (int .Values.terminationGracePeriodSeconds) (int .Values.drain.preStopSleepSeconds)) 10 }}
{{- else }}
{{- int .Values.vllm.shutdownTimeoutSeconds }}
{{- end }}
{{- end }}

{{/* Seconds the proxy drains after SIGTERM: the value, or the grace period less the preStop sleep
less 5 s (it outlives the engine's drain, so it relays the last answers). */}}
{{- define "loragate.proxyDrainTimeout" -}}
{{- if kindIs "invalid" .Values.proxy.drainTimeoutSeconds }}
{{- sub (sub (int .Values.terminationGracePeriodSeconds) (int .Values.drain.preStopSleepSeconds)) 5 }}
{{- else }}
{{- .Values.proxy.drainTimeoutSeconds }}
{{- end }}
{{- end }}

{{/* PromQL: vLLM's waiting requests over the release's engines (the ServiceMonitor's targets
carry namespace, service and loragate_target). */}}
{{- define "loragate.waitingRequestsQuery" -}}
{{- printf "sum(vllm:num_requests_waiting{namespace=\"%s\",service=\"%s\",loragate_target=\"engine\"})" .Release.Namespace (include "loragate.fullname" .) }}
{{- end }}

{{/* "true" when the proxy reconciles the promoted set into the engine (else ""). */}}
{{- define "loragate.reconciled" -}}
{{- if and .Values.lora.enabled (eq .Values.adapters.delivery "reconciler") }}true{{ end }}
{{- end }}

{{/* Where the promoted-set ConfigMap is mounted in the proxy, and the file in it. */}}
{{- define "loragate.promotedSetDir" -}}/etc/loragate/promoted{{- end }}
{{- define "loragate.promotedSetFile" -}}{{ include "loragate.promotedSetDir" . }}/promoted.json{{- end }}

{{/* The promoted-set file (loragate.core.promoted_set): adapter folders under the adapters
mount. Helm's toJson sorts keys and is compact; its revision is sha256 of these bytes. */}}
{{- define "loragate.promotedSetJson" -}}
{{- $entries := list }}
{{- range .Values.adapters.promoted }}
{{- $entries = append $entries (dict "name" .name "path" (trimSuffix "/" .path)) }}
{{- end }}
{{- dict "base" (trimSuffix "/" .Values.adapters.mountPath) "adapters" $entries | toJson }}
{{- end }}

{{/* Checks across values that the schema cannot express; each fails with what to change. */}}
{{- define "loragate.validate" -}}
{{- $names := dict }}
{{- range .Values.adapters.promoted }}
{{- if hasKey $names .name }}
{{- fail (printf "adapters.promoted: adapter %q is listed twice" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- if and (not .Values.lora.enabled) .Values.adapters.promoted }}
{{- fail "adapters.promoted lists adapters but lora.enabled is false: vLLM could not serve them" }}
{{- end }}
{{- if and .Values.lora.enabled .Values.lora.maxCpuLoras }}
{{- if lt (int .Values.lora.maxCpuLoras) (int .Values.lora.maxLoras) }}
{{- fail (printf "lora.maxCpuLoras (%d) must be >= lora.maxLoras (%d): vLLM refuses to start otherwise" (int .Values.lora.maxCpuLoras) (int .Values.lora.maxLoras)) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.adapters.source "objectStorage") (not .Values.adapters.objectStorage.uri) }}
{{- fail "adapters.objectStorage.uri (e.g. s3://bucket/adapters) is required when adapters.source is objectStorage" }}
{{- end }}
{{- if and (eq .Values.adapters.source "pvc") (not .Values.adapters.pvc.claimName) }}
{{- fail "adapters.pvc.claimName is required when adapters.source is pvc" }}
{{- end }}
{{- if eq (int .Values.vllm.port) (int .Values.proxy.port) }}
{{- fail (printf "vllm.port and proxy.port are both %d; they share the pod's network" (int .Values.proxy.port)) }}
{{- end }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $sleep := int .Values.drain.preStopSleepSeconds }}
{{- $engineDrain := int (include "loragate.vllmShutdownTimeout" .) }}
{{- $proxyDrain := float64 (include "loragate.proxyDrainTimeout" .) }}
{{- if lt $engineDrain 1 }}
{{- fail (printf "terminationGracePeriodSeconds (%d) leaves no time for vLLM to drain after the %d s preStop sleep (vllm.shutdownTimeoutSeconds would be %d; 0 aborts requests in flight): raise it, or set vllm.shutdownTimeoutSeconds and proxy.drainTimeoutSeconds" $grace $sleep $engineDrain) }}
{{- end }}
{{- if lt $proxyDrain (float64 $engineDrain) }}
{{- fail (printf "proxy.drainTimeoutSeconds (%v) is shorter than vllm.shutdownTimeoutSeconds (%d): the proxy would stop before the engine's last answers" $proxyDrain $engineDrain) }}
{{- end }}
{{- if gt (addf $proxyDrain $sleep) (float64 $grace) }}
{{- fail (printf "drain.preStopSleepSeconds (%d) + proxy.drainTimeoutSeconds (%v) exceed terminationGracePeriodSeconds (%d): the pod would be killed mid-drain" $sleep $proxyDrain $grace) }}
{{- end }}
{{- $gpus := dig "limits" "nvidia.com/gpu" nil .Values.vllm.resources }}
{{- if and $gpus .Values.vllm.tensorParallelSize }}
{{- if ne (int $gpus) (int .Values.vllm.tensorParallelSize) }}
{{- fail (printf "vllm.tensorParallelSize (%d) must equal the GPUs in vllm.resources.limits[nvidia.com/gpu] (%d)" (int .Values.vllm.tensorParallelSize) (int $gpus)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* `vllm serve` arguments (after the executable and "serve"). */}}
{{- define "loragate.vllmArgs" -}}
{{- $v := .Values.vllm -}}
- {{ include "loragate.modelArg" . | quote }}
- --served-model-name
- {{ include "loragate.servedModelName" . | quote }}
- --host
- "127.0.0.1"
- --port
- {{ $v.port | quote }}
{{- if and (eq .Values.model.source "hub") .Values.model.revision }}
- --revision
- {{ .Values.model.revision | quote }}
{{- end }}
{{- if $v.dtype }}
- --dtype
- {{ $v.dtype | quote }}
{{- end }}
- --max-model-len
- {{ $v.maxModelLen | quote }}
{{- if kindIs "bool" $v.enableChunkedPrefill }}
- {{ ternary "--enable-chunked-prefill" "--no-enable-chunked-prefill" $v.enableChunkedPrefill }}
{{- end }}
{{- if $v.maxNumBatchedTokens }}
- --max-num-batched-tokens
- {{ $v.maxNumBatchedTokens | quote }}
{{- end }}
{{- if $v.maxNumSeqs }}
- --max-num-seqs
- {{ $v.maxNumSeqs | quote }}
{{- end }}
{{- if $v.gpuMemoryUtilization }}
- --gpu-memory-utilization
- {{ $v.gpuMemoryUtilization | quote }}
{{- end }}
{{- if $v.tensorParallelSize }}
- --tensor-parallel-size
- {{ $v.tensorParallelSize | quote }}
{{- end }}
{{- if $v.kvCacheMemoryBytes }}
- --kv-cache-memory-bytes
- {{ $v.kvCacheMemoryBytes | quote }}
{{- end }}
{{- if kindIs "bool" $v.enablePrefixCaching }}
- {{ ternary "--enable-prefix-caching" "--no-enable-prefix-caching" $v.enablePrefixCaching }}
{{- end }}
- --shutdown-timeout
- {{ include "loragate.vllmShutdownTimeout" . | quote }}
{{- if .Values.lora.enabled }}
- --enable-lora
- --max-loras
- {{ .Values.lora.maxLoras | quote }}
- --max-lora-rank
- {{ .Values.lora.maxLoraRank | quote }}
{{- if .Values.lora.maxCpuLoras }}
- --max-cpu-loras
- {{ .Values.lora.maxCpuLoras | quote }}
{{- end }}
{{- if not (include "loragate.reconciled" .) }}
{{- with .Values.adapters.promoted }}
{{- /* JSON, not name=path: vLLM reads an item holding a comma as JSON, so a folder name with a
comma would break the short form. */}}
- --lora-modules
{{- range . }}
- {{ dict "name" .name "path" (printf "%s/%s" (trimSuffix "/" $.Values.adapters.mountPath) .path) | toJson | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
- --disable-uvicorn-access-log
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* An exec probe of vLLM on 127.0.0.1 (the kubelet cannot reach that address): /health
answers 200, or with "served" /v1/models lists the served model name. */}}
{{- define "loragate.vllmProbeExec" -}}
exec:
  command:
    - python3
    - -c
    {{- if .served }}
    - "import json, sys, urllib.request; models = json.load(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))); sys.exit(0 if sys.argv[3] in [m.get('id') for m in models.get('data', [])] else 1)"
    - {{ printf "http://127.0.0.1:%d/v1/models" (int .root.Values.vllm.port) | quote }}
    - {{ .probe.timeoutSeconds | quote }}
    - {{ include "loragate.servedModelName" .root | quote }}
    {{- else }}
    - "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))"
    - {{ printf "http://127.0.0.1:%d/health" (int .root.Values.vllm.port) | quote }}
    - {{ .probe.timeoutSeconds | quote }}
    {{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/* The preStop hook of both containers: sleep while the pod leaves the Service's endpoints. */}}
{{- define "loragate.preStop" -}}
{{- if .Values.drain.preStopSleepSeconds }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ .Values.drain.preStopSleepSeconds | quote }}]
{{- end }}
{{- end }}

{{/* The proxy's environment: keys from the Secret, and settings. */}}
{{- define "loragate.proxyEnv" -}}
- name: LORAGATE_PROXY_PUBLIC_METRICS
  value: {{ .Values.proxy.publicMetrics | quote }}
- name: LORAGATE_PROXY_UPSTREAM_TIMEOUT_S
  value: {{ .Values.proxy.upstreamTimeoutSeconds | quote }}
- name: LORAGATE_PROXY_MAX_BODY_BYTES
  value: {{ .Values.proxy.limits.maxBodyBytes | int64 | quote }}
- name: LORAGATE_PROXY_HEAD_TIMEOUT_S
  value: {{ .Values.proxy.limits.headTimeoutSeconds | quote }}
- name: LORAGATE_PROXY_MAX_HEAD_BYTES
  value: {{ .Values.proxy.limits.maxHeadBytes | int64 | quote }}
- name: LORAGATE_PROXY_MAX_HEADERS
  value: {{ .Values.proxy.limits.maxHeaders | int64 | quote }}
- name: LORAGATE_PROXY_MAX_CONNECTIONS
  value: {{ .Values.proxy.limits.maxConnections | int64 | quote }}
{{- with .Values.proxy.shadows }}
{{- $shadows := list }}
{{- range . }}
{{- $shadow := dict "live" .live "candidate" .candidate "share" .share }}
{{- if hasKey . "maxInFlight" }}
{{- $_ := set $shadow "max_in_flight" (int .maxInFlight) }}
{{- end }}
{{- $shadows = append $shadows $shadow }}
{{- end }}
- name: LORAGATE_PROXY_SHADOWS
  value: {{ toJson $shadows | quote }}
{{- end }}
- name: LORAGATE_PROXY_DRAIN_TIMEOUT_S
  value: {{ include "loragate.proxyDrainTimeout" . | quote }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- if include "loragate.reconciled" . }}
- name: LORAGATE_PROXY_PROMOTED_POLL_S
  value: {{ .Values.adapters.reconciler.pollSeconds | quote }}
- name: LORAGATE_PROXY_PROMOTED_RETRY_S
  value: {{ .Values.adapters.reconciler.retrySeconds | quote }}
- name: LORAGATE_PROXY_PROMOTED_RETRY_MAX_S
  value: {{ .Values.adapters.reconciler.retryMaxSeconds | quote }}
# which adapters it loaded, kept on the pod's emptyDir across proxy restarts
- name: LORAGATE_PROXY_PROMOTED_STATE
  value: /tmp/loragate-promoted-state.json
{{- end }}
{{- with .Values.proxy.auth.existingSecret }}
- name: LORAGATE_PROXY_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.proxy.auth.apiKeysKey | quote }}
{{- if $.Values.proxy.auth.adminKeyKey }}
- name: LORAGATE_PROXY_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.proxy.auth.adminKeyKey | quote }}
{{- end }}
{{- end }}
{{- with .Values.proxy.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The smoke test's configuration: what `helm test` checks (files/smoke_check.py reads it). */}}
{{- define "loragate.smokeConfig" -}}
{{- $adapters := list }}
{{- range .Values.adapters.promoted }}
{{- $adapters = append $adapters (dict "name" .name "api" (default "completions" .api) "output" (default "text" .output) "prompt" (default $.Values.smokeTest.prompt .smokePrompt) "max_tokens" (int (default $.Values.smokeTest.maxTokens .maxTokens))) }}
{{- end }}
{{- $cfg := dict "base_url" (printf "http://%s:%d" (include "loragate.fullname" .) (int .Values.service.port)) "base_model" (include "loragate.servedModelName" .) "adapters" $adapters "timeout_s" (int .Values.smokeTest.timeoutSeconds) }}
{{- toPrettyJson $cfg }}
{{- end }}

{{/* Labels of the `helm test` pod (it must not match the engine's selector). */}}
{{- define "loragate.smokeTestLabels" -}}
helm.sh/chart: {{ include "loragate.chart" . }}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: smoke-test
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loragate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}
