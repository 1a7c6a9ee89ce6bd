{{/*
One gateway gRPC service (Router, Embedding or Cache): its Deployment, Service, autoscaler and
disruption budget. Takes dict root, component, values, port, metricsPort, health (the gRPC service
name its probes ask for), headless (the Router's Service, so Envoy resolves every pod), and env
(the component's own variables, rendered).
*/}}
{{- define "lmcluster.gatewayService" -}}
{{- $prefix := printf "LMC_%s" (upper .component) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  {{- include "lmcluster.metadata" . | nindent 2 }}
  {{- with include "lmcluster.digestSkips" (dict "images" (list .root.Values.images.lmcluster)) }}
  annotations:
    {{- . | nindent 4 }}
  {{- end }}
spec:
  {{- if not .values.autoscaling.enabled }}
  replicas: {{ .values.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "lmcluster.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  template:
    metadata:
      labels:
        {{- include "lmcluster.labels" . | nindent 8 }}
    spec:
      {{- include "lmcluster.podCommon" .root | nindent 6 }}
      terminationGracePeriodSeconds: {{ .values.terminationGracePeriodSeconds }}
      {{- include "lmcluster.spread" . | nindent 6 }}
      {{- with include "lmcluster.scheduling" .values }}{{ . | nindent 6 }}{{ end }}
      containers:
        - name: {{ .component }}
          image: {{ include "lmcluster.image" (dict "root" .root "image" .root.Values.images.lmcluster) }}
          imagePullPolicy: {{ .root.Values.images.pullPolicy }}
          args: ["serve", {{ .component | quote }}]
          ports:
            - {name: grpc, containerPort: {{ .port }}, protocol: TCP}
            - {name: metrics, containerPort: {{ .metricsPort }}, protocol: TCP}
          env:
            - {name: {{ $prefix }}_HOST, value: 0.0.0.0}
            - {name: {{ $prefix }}_PORT, value: {{ .port | quote }}}
            - {name: {{ $prefix }}_METRICS_PORT, value: {{ .metricsPort | quote }}}
            {{- .env | nindent 12 }}
            {{- include "lmcluster.commonEnv" .root | nindent 12 }}
            {{- with .values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "lmcluster.grpcProbes" (dict "port" .port "service" .health "startupSeconds" .values.startupSeconds) | nindent 10 }}
          {{- if .values.preStopSeconds }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", {{ .values.preStopSeconds | quote }}]
          {{- end }}
          resources:
            {{- toYaml .values.resources | nindent 12 }}
          securityContext:
            {{- include "lmcluster.containerSecurityContext" .root | nindent 12 }}
          volumeMounts:
            {{- include "lmcluster.tmpMount" . | nindent 12 }}
      volumes:
        {{- include "lmcluster.tmpVolume" . | nindent 8 }}
---
apiVersion: v1
kind: Service
metadata:
  {{- include "lmcluster.metadata" . | nindent 2 }}
spec:
  {{- if .headless }}
  clusterIP: None
  {{- end }}
  selector:
    {{- include "lmcluster.selectorLabels" . | nindent 4 }}
  ports:
    - {name: grpc, port: {{ .port }}, targetPort: grpc, protocol: TCP}
    - {name: metrics, port: {{ .metricsPort }}, targetPort: metrics, protocol: TCP}
{{ include "lmcluster.scaling" . }}
{{- end -}}
