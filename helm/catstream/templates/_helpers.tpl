{{/* Names, labels and the shared pieces of the pod specs. */}}

{{- define "catstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "catstream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "catstream.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "catstream.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "catstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "catstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: node, producer or retraining. */}}
{{- define "catstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catstream.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "catstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "catstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image: "cpu", "cuda" or "train". */}}
{{- define "catstream.image" -}}
{{- $v := .root.Values.image -}}
{{- $tag := $v.tag | default .root.Chart.AppVersion -}}
{{- if eq .flavour "cuda" }}{{ $tag = $v.cudaTag | default (printf "%s-cuda" .root.Chart.AppVersion) }}{{ end -}}
{{- if eq .flavour "train" }}{{ $tag = $v.trainingTag | default (printf "%s-train" .root.Chart.AppVersion) }}{{ end -}}
{{- printf "%s:%s" $v.repository $tag }}
{{- end }}

{{/* Environment shared by every catstream container: Kafka, topics, MLflow. Secrets come from Secrets. */}}
{{- define "catstream.commonEnv" -}}
{{- if not .Values.kafka.bootstrapServers }}
{{- fail "kafka.bootstrapServers is required: the chart runs against an existing Kafka cluster" }}
{{- end }}
- name: CATSTREAM_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
{{- with .Values.kafka.securityProtocol }}
- name: CATSTREAM_SECURITY_PROTOCOL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.kafka.saslMechanism }}
- name: CATSTREAM_SASL_MECHANISM
  value: {{ . | quote }}
{{- end }}
{{- if hasPrefix "SASL" (upper .Values.kafka.securityProtocol) }}
{{- if not .Values.kafka.sasl.existingSecret }}
{{- fail "kafka.securityProtocol is SASL_*: set kafka.sasl.existingSecret to the Secret holding the credentials" }}
{{- end }}
- name: CATSTREAM_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.usernameKey }}
- name: CATSTREAM_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- if .Values.kafka.tls.enabled }}
- name: CATSTREAM_SSL_CA_LOCATION
  value: /etc/catstream/kafka-tls/{{ .Values.kafka.tls.caKey }}
{{- with .Values.kafka.tls.certKey }}
- name: CATSTREAM_SSL_CERTIFICATE_LOCATION
  value: /etc/catstream/kafka-tls/{{ . }}
{{- end }}
{{- with .Values.kafka.tls.keyKey }}
- name: CATSTREAM_SSL_KEY_LOCATION
  value: /etc/catstream/kafka-tls/{{ . }}
{{- end }}
{{- end }}
{{- with .Values.kafka.extraConfig }}
- name: CATSTREAM_KAFKA_CONFIG
  value: {{ toJson . | quote }}
{{- end }}
- name: CATSTREAM_OFFERS_TOPIC
  value: {{ .Values.topics.offers | quote }}
- name: CATSTREAM_CATEGORIZED_TOPIC
  value: {{ .Values.topics.categorized | quote }}
- name: CATSTREAM_DEAD_LETTER_TOPIC
  value: {{ .Values.topics.deadLetter | quote }}
- name: CATSTREAM_CONSUMER_GROUP
  value: {{ .Values.topics.consumerGroup | quote }}
- name: CATSTREAM_TOPIC_PARTITIONS
  value: {{ .Values.topics.partitions | quote }}
{{- with .Values.mlflow.trackingUri }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
- name: HOME
  value: /var/lib/catstream
{{- end }}

{{- define "catstream.commonEnvFrom" -}}
{{- with .Values.mlflow.existingSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{/* Volumes every pod has: a writable home (the root filesystem is read-only), Kafka TLS files. */}}
{{- define "catstream.commonVolumes" -}}
- name: home
  emptyDir: {}
{{- if .Values.kafka.tls.enabled }}
{{- if not .Values.kafka.tls.existingSecret }}
{{- fail "kafka.tls.enabled: set kafka.tls.existingSecret to the Secret holding the TLS files" }}
{{- end }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret }}
{{- end }}
{{- end }}

{{- define "catstream.commonVolumeMounts" -}}
- name: home
  mountPath: /var/lib/catstream
{{- if .Values.kafka.tls.enabled }}
- name: kafka-tls
  mountPath: /etc/catstream/kafka-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "catstream.dictionariesConfigMap" -}}
{{- .Values.dictionaries.existingConfigMap | default (printf "%s-dictionaries" (include "catstream.fullname" .)) }}
{{- end }}
