{{/*
Shared pieces. Most take a dict: root (the top context), component (router, node, ...) and, for
some, the component's values. Kept here so every pod gets the same security settings and labels.
*/}}

{{/* <release> if it says lmcluster, else <release>-lmcluster; short enough for every suffix. */}}
{{- define "lmcluster.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else if contains (default "lmcluster" .Values.nameOverride) .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (default "lmcluster" .Values.nameOverride) | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lmcluster.name" -}}
{{- printf "%s-%s" (include "lmcluster.fullname" .root) .component -}}
{{- end -}}

{{/* A Service's full DNS name, and with a port, its gRPC address. */}}
{{- define "lmcluster.host" -}}
{{- printf "%s.%s.svc.%s" (include "lmcluster.name" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{- define "lmcluster.address" -}}
{{- printf "%s:%d" (include "lmcluster.host" .) (int .port) -}}
{{- end -}}

{{- define "lmcluster.selectorLabels" -}}
app.kubernetes.io/name: {{ default "lmcluster" .root.Values.nameOverride }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "lmcluster.labels" -}}
{{ include "lmcluster.selectorLabels" . }}
app.kubernetes.io/part-of: lmcluster
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* metadata for a namespaced object: name, namespace (never left to "default") and labels. */}}
{{- define "lmcluster.metadata" -}}
name: {{ include "lmcluster.name" . }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "lmcluster.labels" . | nindent 2 }}
{{- end -}}

{{/* repository:tag[@digest]; an empty tag is the chart's appVersion (plus the GPU suffix if given). */}}
{{- define "lmcluster.image" -}}
{{- $tag := printf "%s%s" (default .root.Chart.AppVersion .image.tag) (default "" .suffix) -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
checkov skip annotations while an image has no digest (dict images: list of image values). Tags
are pinned and IfNotPresent keeps a node on the image it has; lmcluster's own images have no digest
before the user builds and pushes them, so none can be a default. With images.*.digest set,
CKV_K8S_43 (digest) and CKV_K8S_15 (pull Always unless a digest) pass and these go away.
*/}}
{{- define "lmcluster.digestSkips" -}}
{{- $undigested := false -}}
{{- range .images -}}{{- if not .digest -}}{{- $undigested = true -}}{{- end -}}{{- end -}}
{{- if $undigested -}}
checkov.io/skip-digest: CKV_K8S_43=tag pinned; no digest given, and lmcluster images have none until built and pushed (images.*.digest)
checkov.io/skip-pull-policy: CKV_K8S_15=IfNotPresent with a pinned tag; a digest (images.*.digest) makes the check pass
{{- end -}}
{{- end -}}

{{- define "lmcluster.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lmcluster.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod-spec fields every pod shares: no API token, the service account, pull secrets. */}}
{{- define "lmcluster.podCommon" -}}
serviceAccountName: {{ include "lmcluster.fullname" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- include "lmcluster.podSecurityContext" . | nindent 2 }}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Scheduling fields a component's values set (nodeSelector, tolerations, affinity); empty if none. */}}
{{- define "lmcluster.scheduling" -}}
{{- $fields := dict -}}
{{- range $key := list "nodeSelector" "tolerations" "affinity" -}}
{{- with index $ $key }}{{ $_ := set $fields $key . }}{{ end -}}
{{- end -}}
{{- if $fields }}{{ toYaml $fields }}{{ end -}}
{{- end -}}

{{/*
Native gRPC probes on the service's own health name (dict port, service, startupSeconds): startup
covers loading, liveness restarts a process that stopped answering for a minute, readiness takes a
pod out of its Service while the service is not SERVING (its dependencies are not ready).
*/}}
{{- define "lmcluster.grpcProbes" -}}
startupProbe:
  grpc: {port: {{ .port }}, service: {{ .service }}}
  periodSeconds: 5
  failureThreshold: {{ div (int .startupSeconds) 5 }}
livenessProbe:
  grpc: {port: {{ .port }}, service: {{ .service }}}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  grpc: {port: {{ .port }}, service: {{ .service }}}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{/* Environment every lmcluster container shares: logs and traces. */}}
{{- define "lmcluster.commonEnv" -}}
- name: LMC_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: LMC_LOG_FORMAT
  value: json
- name: LMC_TRACE_PROMPTS
  value: {{ .Values.tracing.tracePrompts | toString | quote }}
{{- with .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $.Values.tracing.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $.Values.tracing.samplerArg | quote }}
{{- end }}
{{- end -}}

{{/* Writable scratch space on a read-only root filesystem. */}}
{{- define "lmcluster.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end -}}

{{- define "lmcluster.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Spread a Deployment's pods over nodes where the scheduler can. */}}
{{- define "lmcluster.spread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "lmcluster.selectorLabels" . | nindent 8 }}
{{- end -}}

{{/* The HorizontalPodAutoscaler and PodDisruptionBudget of a Deployment (dict root, component, values). */}}
{{- define "lmcluster.scaling" -}}
{{- if .values.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  {{- include "lmcluster.metadata" . | nindent 2 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "lmcluster.name" . }}
  minReplicas: {{ .values.autoscaling.minReplicas }}
  maxReplicas: {{ .values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .values.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  {{- include "lmcluster.metadata" . | nindent 2 }}
spec:
  maxUnavailable: {{ .values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "lmcluster.selectorLabels" . | nindent 6 }}
{{- end -}}
