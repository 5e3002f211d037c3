{{/* The chart's name, overridable. */}}
{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; a release already named like the chart keeps its name. */}}
{{- define "shoal.fullname" -}}
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

{{- define "shoal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "shoal.labels" -}}
helm.sh/chart: {{ include "shoal.chart" . }}
{{ include "shoal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shoal
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* One service's object name. Call with (dict "root" $ "name" "gateway"). */}}
{{- define "shoal.componentName" -}}
{{- printf "%s-%s" (include "shoal.fullname" .root | trunc 54 | trimSuffix "-") .name }}
{{- end }}

{{- define "shoal.componentLabels" -}}
{{ include "shoal.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "shoal.componentSelectorLabels" -}}
{{ include "shoal.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* The `helm test` pod's labels the gateway's NetworkPolicy lets in. */}}
{{- define "shoal.testSelectorLabels" -}}
{{ include "shoal.selectorLabels" . }}
app.kubernetes.io/component: test
{{- end }}

{{- define "shoal.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shoal.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The bundled NATS's full name: <release>-nats, as the official nats chart names it. */}}
{{- define "shoal.natsFullname" -}}
{{- $nats := .Values.nats | default dict }}
{{- if $nats.fullnameOverride }}
{{- $nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" $nats.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The bundled NATS pods' selector labels (NetworkPolicies of the services select them too). */}}
{{- define "shoal.natsSelectorLabels" -}}
app.kubernetes.io/name: {{ .Values.nats.nameOverride | default "nats" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nats
{{- end }}

{{- define "shoal.natsLabels" -}}
helm.sh/chart: {{ include "shoal.chart" . }}
{{ include "shoal.natsSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.nats.image.tag | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shoal
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* SHOAL_NATS_URL when it is not read from secrets.nats. */}}
{{- define "shoal.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s:4222" (include "shoal.natsFullname" .) }}
{{- else }}
{{- .Values.externalNats.url }}
{{- end }}
{{- end }}

{{/* The termination grace of one service: explicit, or pre-stop + shutdown grace + 15 s. */}}
{{- define "shoal.terminationGrace" -}}
{{- $svc := .svc }}
{{- $floor := add $svc.preStopSleepSeconds $svc.shutdownGraceSeconds }}
{{- if $svc.terminationGracePeriodSeconds }}
{{- if le (int $svc.terminationGracePeriodSeconds) (int $floor) }}
{{- fail (printf "services.%s.terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + shutdownGraceSeconds (%v)" .name $svc.terminationGracePeriodSeconds $floor) }}
{{- end }}
{{- $svc.terminationGracePeriodSeconds }}
{{- else }}
{{- add $floor 15 }}
{{- end }}
{{- end }}

{{/* Fail early, with the value to set, on what a production install cannot do without. */}}
{{- define "shoal.validate" -}}
{{- if not .Values.secrets.database.existingSecret }}
{{- $needsDb := false }}
{{- range $name, $svc := .Values.services }}{{ if and $svc.enabled $svc.database }}{{ $needsDb = true }}{{ end }}{{ end }}
{{- if $needsDb }}
{{- fail "secrets.database.existingSecret is required: a Secret whose key (secrets.database.key) holds postgresql+asyncpg://user:password@host:5432/shoal" }}
{{- end }}
{{- end }}
{{- if and .Values.services.keys.enabled (not .Values.secrets.keys.existingSecret) }}
{{- fail "secrets.keys.existingSecret is required: a Secret with the keys service's pepper (and KEK)" }}
{{- end }}
{{- $ring := .Values.secrets.keys.kekRing }}
{{- if and .Values.services.keys.enabled (not .Values.secrets.keys.kekKey) (not $ring.existingSecret) }}
{{- fail "the keys service needs a KEK: set secrets.keys.kekKey (a key of secrets.keys.existingSecret) or secrets.keys.kekRing.existingSecret" }}
{{- end }}
{{- if and $ring.existingSecret (not $ring.activeKek) }}
{{- fail "secrets.keys.kekRing.activeKek is required with a KEK ring: the id of the KEK new data keys are wrapped with (SHOAL_KEYS_ACTIVE_KEK)" }}
{{- end }}
{{- if and .Values.services.scheduler.enabled (not .Values.secrets.scheduler.existingSecret) }}
{{- fail "secrets.scheduler.existingSecret is required: a Secret whose key (secrets.scheduler.webhookSecretsKey) holds the base64 of 32 random bytes (SHOAL_SCHEDULER_WEBHOOK_SECRETS_KEY)" }}
{{- end }}
{{- if not .Values.objectStore.bucket }}
{{- fail "objectStore.bucket is required: the S3 bucket Shoal stores files and artifacts in" }}
{{- end }}
{{- if and (not .Values.nats.enabled) (not .Values.externalNats.url) (not .Values.secrets.nats.existingSecret) }}
{{- fail "nats.enabled=false needs externalNats.url (or secrets.nats.existingSecret)" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.nats.config.cluster.enabled }}
{{- if gt (int .Values.config.streamReplicas) (int .Values.nats.config.cluster.replicas) }}
{{- fail "config.streamReplicas cannot exceed nats.config.cluster.replicas" }}
{{- end }}
{{- else if and .Values.nats.enabled (gt (int .Values.config.streamReplicas) 1) }}
{{- fail "a single bundled NATS server (nats.config.cluster.enabled=false) needs config.streamReplicas=1" }}
{{- end }}
{{- $natsFiles := .Values.secrets.nats.files }}
{{- if and $natsFiles.credsKey $natsFiles.nkeySeedKey }}
{{- fail "secrets.nats.files: set credsKey or nkeySeedKey, not both (a .creds file holds the seed)" }}
{{- end }}
{{- if ne (empty $natsFiles.tlsCertKey) (empty $natsFiles.tlsKeyKey) }}
{{- fail "secrets.nats.files.tlsCertKey and tlsKeyKey go together (mutual TLS)" }}
{{- end }}
{{- if and $natsFiles.existingSecret (not (or $natsFiles.credsKey $natsFiles.nkeySeedKey $natsFiles.tlsCaKey $natsFiles.tlsCertKey)) }}
{{- fail "secrets.nats.files.existingSecret is set but names no key: set credsKey, nkeySeedKey, tlsCaKey or tlsCertKey" }}
{{- end }}
{{- if and (not $natsFiles.existingSecret) (or $natsFiles.credsKey $natsFiles.nkeySeedKey $natsFiles.tlsCaKey $natsFiles.tlsCertKey) }}
{{- fail "secrets.nats.files.existingSecret is required when a NATS credentials or TLS key is set" }}
{{- end }}
{{- if and (eq .Values.environment "production") (hasKey .Values.config.extraEnv "SHOAL_DEV_ADMIN_KEY") }}
{{- fail "SHOAL_DEV_ADMIN_KEY is for development only; create API keys through the API" }}
{{- end }}
{{- end }}

{{/* A NetworkPolicy egress rule: (dict "ports" [...] "to" [...]); empty `to` = any destination. */}}
{{- define "shoal.egressRule" -}}
- ports:
    {{- toYaml .ports | nindent 4 }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* NATS credentials and TLS files (secrets.nats.files): env, volumeMounts and volumes of a pod
that connects to NATS. Each takes the root context; each renders nothing when no Secret is set. */}}
{{- define "shoal.natsFilesEnv" -}}
{{- $files := .Values.secrets.nats.files }}
{{- if $files.existingSecret }}
{{- range $setting, $key := dict "SHOAL_NATS_CREDS_FILE" $files.credsKey "SHOAL_NATS_NKEY_SEED_FILE" $files.nkeySeedKey "SHOAL_NATS_TLS_CA_FILE" $files.tlsCaKey "SHOAL_NATS_TLS_CERT_FILE" $files.tlsCertKey "SHOAL_NATS_TLS_KEY_FILE" $files.tlsKeyKey }}
{{- if $key }}
- name: {{ $setting }}
  value: /etc/shoal/nats/{{ $key }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shoal.natsFilesVolumeMount" -}}
{{- if .Values.secrets.nats.files.existingSecret }}
- name: nats-files
  mountPath: /etc/shoal/nats
  readOnly: true
{{- end }}
{{- end }}

{{- define "shoal.natsFilesVolume" -}}
{{- with .Values.secrets.nats.files.existingSecret }}
- name: nats-files
  secret:
    secretName: {{ . }}
    # Readable by the service's group alone.
    defaultMode: 0440
{{- end }}
{{- end }}
