{{/*
Names and labels (Helm's conventions: app.kubernetes.io/*, helm.sh/chart).
*/}}
{{- define "nomoat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nomoat.fullname" -}}
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

{{- define "nomoat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "nomoat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nomoat.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of one component's objects. */}}
{{- define "nomoat.labels" -}}
helm.sh/chart: {{ include "nomoat.chart" .root }}
{{ include "nomoat.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: nomoat
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "nomoat.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "nomoat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nomoat.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the gateway's key hashes. */}}
{{- define "nomoat.keysSecretName" -}}
{{- default (printf "%s-keys" (include "nomoat.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* The chart's own Secret of the keys between the gateway and its edge nodes. */}}
{{- define "nomoat.edgeSecretName" -}}
{{- printf "%s-edge-keys" (include "nomoat.fullname" .) }}
{{- end }}

{{- define "nomoat.accountingSecretName" -}}
{{- default (printf "%s-accounting" (include "nomoat.fullname" .)) .Values.accounting.existingSecret }}
{{- end }}

{{- define "nomoat.vllmName" -}}
{{- printf "%s-vllm-%s" (include "nomoat.fullname" .root) .pool.name | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "nomoat.edgeName" -}}
{{- printf "%s-edge" (include "nomoat.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "nomoat.adaptersClaim" -}}
{{- default (printf "%s-adapters" (include "nomoat.fullname" .)) .Values.adapters.existingClaim }}
{{- end }}

{{/* Whether the gateway's key hashes come from a Secret at all. */}}
{{- define "nomoat.hasKeys" -}}
{{- if or .Values.auth.existingSecret .Values.auth.generateApiKey .Values.auth.apiKeyHashes .Values.auth.adminKeyHashes }}true{{ end }}
{{- end }}

{{/* Accounting on an external database: the URLs from a Secret, the migration hook. */}}
{{- define "nomoat.externalDatabase" -}}
{{- if and .Values.accounting.enabled (or .Values.accounting.existingSecret .Values.accounting.databaseUrl) }}true{{ end }}
{{- end }}

{{- define "nomoat.externalRedis" -}}
{{- if and .Values.accounting.enabled (or (and .Values.accounting.existingSecret .Values.accounting.redis) .Values.accounting.redisUrl) }}true{{ end }}
{{- end }}

{{- define "nomoat.migrationHook" -}}
{{- if and (include "nomoat.externalDatabase" .) .Values.accounting.migration.enabled }}true{{ end }}
{{- end }}

{{/*
The pod-level settings every nomoat container (gateway, edge node, migration
job) shares: a read-only root, writable /tmp and /data (HOME: the accounting
SQLite file, the adapter cache, uploads live below it).
*/}}
{{- define "nomoat.writableMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /data
{{- end }}

{{- define "nomoat.writableVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.writableVolumes.tmpSize }}
- name: data
  emptyDir:
    sizeLimit: {{ .Values.writableVolumes.dataSize }}
{{- end }}

{{- define "nomoat.homeEnv" -}}
- name: HOME
  value: /data
- name: XDG_DATA_HOME
  value: /data/share
- name: XDG_CACHE_HOME
  value: /data/cache
{{- end }}

{{/*
TOML. Helm's own toToml writes every number of the values as a float (8000.0),
so nomoat.toml is written here: a key bare when TOML allows it, else quoted.
*/}}
{{- define "nomoat.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* One value, inline: strings as JSON strings (valid TOML basic strings),
numbers without a fraction as integers, lists as arrays, maps as inline tables. */}}
{{- define "nomoat.tomlValue" -}}
{{- $kind := kindOf . -}}
{{- if eq $kind "string" }}{{ toJson . }}
{{- else if eq $kind "bool" }}{{ . }}
{{- else if eq $kind "float64" }}{{ if eq (float64 (int64 .)) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if hasPrefix "int" $kind }}{{ . }}
{{- else if eq $kind "slice" }}
{{- $items := list }}
{{- range . }}{{ $items = append $items (include "nomoat.tomlValue" .) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if eq $kind "map" }}
{{- $items := list }}
{{- range $key, $value := . }}
{{- if ne (kindOf $value) "invalid" }}
{{- $items = append $items (printf "%s = %s" (include "nomoat.tomlKey" $key) (include "nomoat.tomlValue" $value)) }}
{{- end }}
{{- end }}
{{- if $items }}{{ printf "{ %s }" (join ", " $items) }}{{ else }}{}{{ end }}
{{- else }}{{ fail (printf "nomoat.toml: a %s value cannot be written in TOML" $kind) }}
{{- end }}
{{- end }}

{{/* A table: (list PATH MAP). Its plain keys first, then each map as a
[PATH.KEY] table; keys set to null are left out (TOML has no null). */}}
{{- define "nomoat.tomlTable" -}}
{{- $path := index . 0 -}}
{{- $table := index . 1 -}}
{{- $plain := 0 }}
{{- $nested := 0 }}
{{- range $key, $value := $table }}
{{- if eq (kindOf $value) "map" }}{{ $nested = add1 $nested }}{{ else if ne (kindOf $value) "invalid" }}{{ $plain = add1 $plain }}{{ end }}
{{- end }}
{{- /* A table of tables only needs no header of its own. */}}
{{- if and $path (or $plain (not $nested)) }}

[{{ $path }}]
{{- end }}
{{- range $key, $value := $table }}
{{- $kind := kindOf $value }}
{{- if and (ne $kind "map") (ne $kind "invalid") }}
{{ include "nomoat.tomlKey" $key }} = {{ include "nomoat.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key, $value := $table }}
{{- if eq (kindOf $value) "map" }}
{{- $sub := include "nomoat.tomlKey" $key }}
{{- if $path }}{{ $sub = printf "%s.%s" $path $sub }}{{ end }}
{{- include "nomoat.tomlTable" (list $sub $value) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The gateway's nomoat.toml as a map (JSON): gateway.config, then what the chart
owns over it (where it listens, the adapter root, migrations), then the
backends and deployments of the embedded engine, the vLLM pools (one backend
per replica) and the edge nodes (one backend per replica). Secrets never come
here: they reach the pods as NOMOAT_* and *_API_KEY environment variables.
*/}}
{{- define "nomoat.config" -}}
{{- $v := .Values -}}
{{- $root := . -}}
{{- $cfg := deepCopy $v.gateway.config -}}
{{- range $section := list "server" "backends" "models" "lora" "accounting" }}
{{- if not (hasKey $cfg $section) }}{{ $_ := set $cfg $section dict }}{{ end }}
{{- end }}
{{- $server := $cfg.server }}
{{- $_ := set $server "host" "0.0.0.0" }}
{{- $_ := set $server "port" $v.gateway.port }}
{{- $_ := set $server "shutdown_grace_seconds" $v.gateway.shutdownGraceSeconds }}
{{- $_ := set $server "allow_unauthenticated_network" $v.auth.allowUnauthenticated }}
{{- $_ := set $cfg.accounting "enabled" $v.accounting.enabled }}
{{- if include "nomoat.migrationHook" . }}
{{- $_ := set $cfg.accounting "migrate_on_start" false }}
{{- end }}
{{- if $v.adapters.enabled }}
{{- $_ := set $cfg.lora "root" $v.adapters.mountPath }}
{{- end }}
{{- $generated := dict }}
{{- if $v.gateway.embedded.enabled }}
{{- $embedded := merge (dict "type" "llamacpp" "parallel" $v.gateway.embedded.parallel "threads" $v.gateway.embedded.threads) $v.gateway.embedded.options }}
{{- $_ := set $cfg.backends "embedded" $embedded }}
{{- $name := $v.gateway.embedded.modelName }}
{{- $_ := set $generated $name (append (get $generated $name | default list) (dict "backend" "embedded" "model" $name)) }}
{{- end }}
{{- range $pool := $v.vllm.pools }}
{{- $service := include "nomoat.vllmName" (dict "root" $root "pool" $pool) }}
{{- range $i := until (int $pool.replicas) }}
{{- $backend := printf "vllm-%s-%d" $pool.name $i }}
{{- $url := printf "http://%s-%d.%s.%s.svc.%s:%d/v1" $service $i $service $root.Release.Namespace $v.clusterDomain (int $v.vllm.port) }}
{{- $options := merge (dict "type" "vllm" "base_url" $url "models" (list $pool.servedModelName)) ($pool.backendOptions | default dict) }}
{{- if $v.adapters.enabled }}{{ $_ := set $options "adapter_root" $v.adapters.mountPath }}{{ end }}
{{- $_ := set $cfg.backends $backend $options }}
{{- $_ := set $generated $pool.servedModelName (append (get $generated $pool.servedModelName | default list) (dict "backend" $backend "model" $pool.servedModelName)) }}
{{- end }}
{{- end }}
{{- if $v.edge.enabled }}
{{- $service := include "nomoat.edgeName" . }}
{{- range $i := until (int $v.edge.replicas) }}
{{- $backend := printf "edge-%d" $i }}
{{- $url := printf "http://%s-%d.%s.%s.svc.%s:%d/v1" $service $i $service $root.Release.Namespace $v.clusterDomain (int $v.edge.port) }}
{{- $options := merge (dict "type" "edge" "base_url" $url "models" (list $v.edge.modelName) "api_key_env" "NOMOAT_EDGE_API_KEY") $v.edge.backendOptions }}
{{- if $v.adapters.enabled }}
{{- $_ := set $options "adapter_root" $v.adapters.mountPath }}
{{- $_ := set $options "admin_api_key_env" "NOMOAT_EDGE_ADMIN_KEY" }}
{{- end }}
{{- $_ := set $cfg.backends $backend $options }}
{{- $_ := set $generated $v.edge.modelName (append (get $generated $v.edge.modelName | default list) (dict "backend" $backend "model" $v.edge.modelName)) }}
{{- end }}
{{- end }}
{{- range $name, $deployments := $generated }}
{{- $model := get $cfg.models $name | default dict }}
{{- $_ := set $model "deployments" (concat ($model.deployments | default list) $deployments) }}
{{- if and (not (hasKey $model "policy")) (gt (len $model.deployments) 1) }}
{{- $_ := set $model "policy" $v.gateway.defaultPolicy }}
{{- end }}
{{- $_ := set $cfg.models $name $model }}
{{- end }}
{{- range $name, $model := $cfg.models }}
{{- if not $model.deployments }}
{{- fail (printf "nomoat: gateway.config.models.%s has no deployments and no pool or edge node serves %s" $name $name) }}
{{- end }}
{{- end }}
{{- if not $cfg.models }}
{{- fail "nomoat: no model to serve: enable gateway.embedded, a vllm.pools entry, edge, or list models in gateway.config.models" }}
{{- end }}
{{- toJson $cfg }}
{{- end }}

{{- define "nomoat.toml" -}}
# nomoat.toml, rendered by the Helm chart {{ include "nomoat.chart" . }} from its values
# (`nomoat check-config` validates it). Secrets are not here: key hashes, the
# database and Redis URLs and upstream keys arrive as environment variables.
{{ include "nomoat.tomlTable" (list "" (include "nomoat.config" . | fromJson)) }}
{{- end }}

{{/* OTEL_* of the gateway (the standard variables win over [telemetry]). */}}
{{- define "nomoat.otelEnv" -}}
{{- $otlp := .Values.telemetry.otlp }}
{{- if $otlp.enabled }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_SERVICE_NAME
  value: nomoat
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otlp.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $otlp.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $otlp.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $otlp.samplerArg | quote }}
{{- $attributes := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" }}
{{- range $key, $value := $otlp.resourceAttributes }}
{{- $attributes = append $attributes (printf "%s=%s" $key $value) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attributes | quote }}
{{- if $otlp.metrics }}
- name: OTEL_METRICS_EXPORTER
  value: otlp
{{- end }}
{{- if $otlp.headersSecret.name }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ $otlp.headersSecret.name }}
      key: {{ $otlp.headersSecret.key }}
{{- end }}
{{- end }}
{{- end }}

{{/* The accounting URLs, for the gateway and the migration job. */}}
{{- define "nomoat.accountingEnv" -}}
{{- if include "nomoat.externalDatabase" . }}
- name: NOMOAT_ACCOUNTING__DATABASE
  valueFrom:
    secretKeyRef:
      name: {{ include "nomoat.accountingSecretName" . }}
      key: database-url
{{- end }}
{{- if include "nomoat.externalRedis" . }}
- name: NOMOAT_ACCOUNTING__REDIS
  valueFrom:
    secretKeyRef:
      name: {{ include "nomoat.accountingSecretName" . }}
      key: redis-url
{{- end }}
{{- end }}

{{/* Everything secret the gateway reads, by environment variable. */}}
{{- define "nomoat.gatewayEnv" -}}
{{ include "nomoat.homeEnv" . }}
{{- if include "nomoat.hasKeys" . }}
- name: NOMOAT_SERVER__API_KEY_HASHES
  valueFrom:
    secretKeyRef:
      name: {{ include "nomoat.keysSecretName" . }}
      key: api-key-hashes
      optional: {{ not (empty .Values.auth.existingSecret) }}
- name: NOMOAT_SERVER__ADMIN_KEY_HASHES
  valueFrom:
    secretKeyRef:
      name: {{ include "nomoat.keysSecretName" . }}
      key: admin-key-hashes
      optional: {{ not (empty .Values.auth.existingSecret) }}
{{- end }}
{{- include "nomoat.accountingEnv" . }}
{{- if .Values.edge.enabled }}
- name: NOMOAT_EDGE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "nomoat.edgeSecretName" . }}
      key: api-key
- name: NOMOAT_EDGE_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "nomoat.edgeSecretName" . }}
      key: admin-key
{{- end }}
{{- include "nomoat.otelEnv" . }}
{{- range .Values.gateway.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .secretKey }}
{{- end }}
{{- with .Values.gateway.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The model NOTES.txt calls: the first pool's, else the edge nodes', else the embedded one. */}}
{{- define "nomoat.exampleModel" -}}
{{- if .Values.vllm.pools }}{{ (first .Values.vllm.pools).servedModelName }}
{{- else if .Values.edge.enabled }}{{ .Values.edge.modelName }}
{{- else if .Values.gateway.embedded.enabled }}{{ .Values.gateway.embedded.modelName }}
{{- else }}{{ keys (include "nomoat.config" . | fromJson).models | sortAlpha | first }}
{{- end }}
{{- end }}
