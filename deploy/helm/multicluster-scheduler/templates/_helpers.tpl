{{/* Chart name, truncated to a DNS label. */}}
{{- define "mcs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: <release>-multicluster-scheduler (or the release name alone when it
already contains the chart name). Truncated so every "<fullname>-<suffix>" object name stays short.
*/}}
{{- define "mcs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>"; call with (list $ "suffix"). */}}
{{- define "mcs.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "mcs.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mcs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "mcs.labels" -}}
helm.sh/chart: {{ include "mcs.chart" . }}
{{ include "mcs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: multicluster-scheduler
{{- end -}}

{{- define "mcs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mcs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component; call with (list $ "component"). */}}
{{- define "mcs.componentLabels" -}}
{{ include "mcs.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "mcs.componentSelectorLabels" -}}
{{ include "mcs.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "mcs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mcs.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mcs.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Service in front of the watchers' admission webhook. */}}
{{- define "mcs.webhookServiceName" -}}
{{- include "mcs.componentName" (list . "watcher") -}}
{{- end -}}

{{- define "mcs.webhookSecretName" -}}
{{- include "mcs.componentName" (list . "webhook-tls") -}}
{{- end -}}

{{/*
The webhook's serving certificate and CA as JSON {crt, key, ca} (base64 PEM), generated with
genCA/genSignedCert for the watcher Service's DNS names, or reused from the existing Secret
(lookup) so that `helm upgrade` keeps them. Memoized in .Values so that the Secret, the
MutatingWebhookConfiguration's caBundle and the watcher's checksum agree within one render.
*/}}
{{- define "mcs.webhookCerts" -}}
{{- if not (hasKey .Values "__mcsWebhookCerts") -}}
{{- $service := include "mcs.webhookServiceName" . -}}
{{- $namespace := .Release.Namespace -}}
{{- $existing := lookup "v1" "Secret" $namespace (include "mcs.webhookSecretName" .) -}}
{{- $certs := dict
      "crt" (dig "data" "tls.crt" "" $existing)
      "key" (dig "data" "tls.key" "" $existing)
      "ca" (dig "data" "ca.crt" "" $existing) -}}
{{- if not (and $certs.crt $certs.key $certs.ca) -}}
{{- $days := int .Values.webhook.certValidityDays -}}
{{- $dnsNames := list
      (printf "%s.%s.svc" $service $namespace)
      (printf "%s.%s.svc.cluster.local" $service $namespace)
      (printf "%s.%s" $service $namespace)
      $service -}}
{{- $ca := genCA "multicluster-scheduler-webhook-ca" $days -}}
{{- $cert := genSignedCert (printf "%s.%s.svc" $service $namespace) nil $dnsNames $days $ca -}}
{{- $certs = dict "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) "ca" ($ca.Cert | b64enc) -}}
{{- end -}}
{{- $_ := set .Values "__mcsWebhookCerts" $certs -}}
{{- end -}}
{{- toJson (get .Values "__mcsWebhookCerts") -}}
{{- end -}}

{{- define "mcs.natsName" -}}
{{- include "mcs.componentName" (list . "nats") -}}
{{- end -}}

{{/* Secret holding a remote target's kubeconfig (key "config"); call with (list $ target). */}}
{{- define "mcs.targetSecretName" -}}
{{- $root := index . 0 -}}
{{- $target := index . 1 -}}
{{- if $target.kubeconfigSecret -}}
{{- $target.kubeconfigSecret -}}
{{- else -}}
{{- printf "%s-target-%s" $root.Release.Name $target.name | trunc 253 -}}
{{- end -}}
{{- end -}}

{{/* nats.url if set, else the bundled server's Service; fails when there is neither. */}}
{{- define "mcs.natsUrl" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else if .Values.nats.bundled.enabled -}}
{{- printf "nats://%s.%s.svc:4222" (include "mcs.natsName" .) .Release.Namespace -}}
{{- else -}}
{{- fail "multicluster-scheduler needs NATS with JetStream: set nats.url to your NATS server (e.g. --set nats.url=nats://nats.nats.svc:4222) or set nats.bundled.enabled=true to run a single-node NATS in the release namespace" -}}
{{- end -}}
{{- end -}}

{{/* Checks the schema cannot express, with messages that say what to change. */}}
{{- define "mcs.validate" -}}
{{- $names := list .Values.clusterName -}}
{{- $targetNames := list -}}
{{- if .Values.targetSelf -}}
{{- $targetNames = append $targetNames .Values.clusterName -}}
{{- end -}}
{{- range .Values.targets -}}
{{- if has .name $names -}}
{{- fail (printf "targets: cluster name %q is used twice (clusterName and target names must be unique)" .name) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- $targetNames = append $targetNames .name -}}
{{- end -}}
{{- if and .Values.source (not $targetNames) -}}
{{- fail "no target cluster: set targetSelf=true or list remote clusters in targets" -}}
{{- end -}}
{{- if and .Values.nats.bundled.enabled (not .Values.nats.url) (gt (int .Values.nats.streamReplicas) 1) -}}
{{- fail "nats.streamReplicas > 1 needs a NATS cluster of as many servers (nats.url); the bundled NATS is one server" -}}
{{- end -}}
{{- if and .Values.nats.auth.tlsClientCert (not .Values.nats.auth.tlsSecret) -}}
{{- fail "nats.auth.tlsClientCert needs nats.auth.tlsSecret (its tls.crt and tls.key)" -}}
{{- end -}}
{{- range .Values.candidateScheduler.serveTargets -}}
{{- if not (has . $targetNames) -}}
{{- fail (printf "candidateScheduler.serveTargets names %q, which is not a target (targets: %s)" . (join ", " $targetNames)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
config.yaml read by every service (MCS_CONFIG), see docs/configuration.md. The local cluster is
reached in-cluster (no kubeconfig); remote targets through their mounted kubeconfigs.
*/}}
{{- define "mcs.config" -}}
{{- $self := dict "name" .Values.clusterName "source" .Values.source "target" .Values.targetSelf -}}
{{- if .Values.clusterLabels -}}
{{- $_ := set $self "labels" .Values.clusterLabels -}}
{{- end -}}
{{- $clusters := list $self -}}
{{- range .Values.targets -}}
{{- $cluster := dict "name" .name "kubeconfig" (printf "/etc/mcs/targets/%s/config" .name) "source" false "target" true -}}
{{- if .context -}}
{{- $_ := set $cluster "context" .context -}}
{{- end -}}
{{- if .labels -}}
{{- $_ := set $cluster "labels" .labels -}}
{{- end -}}
{{- $clusters = append $clusters $cluster -}}
{{- end -}}
{{- $service := include "mcs.webhookServiceName" . -}}
{{- $webhook := dict
      "enabled" true
      "listen_host" "0.0.0.0"
      "port" 8443
      "url" (printf "https://%s.%s.svc:443" $service .Release.Namespace)
      "cert_file" "/etc/mcs/tls/tls.crt"
      "key_file" "/etc/mcs/tls/tls.key"
      "ca_file" "/etc/mcs/tls/ca.crt"
      "register_webhook" false
      "failure_policy" .Values.webhook.failurePolicy
      "timeout_seconds" (int .Values.webhook.timeoutSeconds) -}}
{{- $config := dict
      "clusters" $clusters
      "nats_url" (include "mcs.natsUrl" .)
      "stream_replicas" (int .Values.nats.streamReplicas)
      "subject_prefix" .Values.subjectPrefix
      "resync_period_seconds" .Values.resyncPeriodSeconds
      "failover_seconds" .Values.failoverSeconds
      "metrics_port" (int .Values.metricsPort)
      "log_level" .Values.logLevel
      "webhook" $webhook -}}
{{- if .Values.otlpEndpoint -}}
{{- $_ := set $config "otlp_endpoint" .Values.otlpEndpoint -}}
{{- end -}}
{{- if .Values.candidateScheduler.serveTargets -}}
{{- $_ := set $config "serve_targets" .Values.candidateScheduler.serveTargets -}}
{{- end -}}
{{- /* Each Deployment names its own password file (MCS_NATS_AUTH__PASSWORD_FILE). */ -}}
{{- $natsAuth := dict -}}
{{- if .Values.nats.auth.allowAnonymous -}}
{{- $_ := set $natsAuth "allow_anonymous" true -}}
{{- end -}}
{{- if .Values.nats.auth.tlsSecret -}}
{{- $_ := set $natsAuth "tls_ca_file" "/etc/mcs/nats-tls/ca.crt" -}}
{{- if .Values.nats.auth.tlsClientCert -}}
{{- $_ := set $natsAuth "tls_cert_file" "/etc/mcs/nats-tls/tls.crt" -}}
{{- $_ := set $natsAuth "tls_key_file" "/etc/mcs/nats-tls/tls.key" -}}
{{- end -}}
{{- end -}}
{{- $_ := set $config "nats_auth" $natsAuth -}}
{{- $config = merge $config (deepCopy (default dict .Values.extraConfig)) -}}
{{- toYaml $config -}}
{{- end -}}
