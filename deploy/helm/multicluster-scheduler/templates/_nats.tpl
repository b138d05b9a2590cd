{{/*
NATS identities: a user per stage with the least permissions it needs.
The same lists as libs/mcsched/natsauth.py (stage_permissions); tests/integration/test_helm_chart.py
renders both and compares them.
*/}}

{{/* The Secret holding a NATS password per stage (keys: the stage names, and admin for the bundled NATS). */}}
{{- define "mcs.natsAuthSecretName" -}}
{{- .Values.nats.auth.existingSecret | default (include "mcs.componentName" (list . "nats-auth")) -}}
{{- end -}}

{{/* Environment variable holding a user's password in the bundled NATS container. */}}
{{- define "mcs.natsPasswordVariable" -}}
{{- printf "MCS_NATS_PASSWORD_%s" (. | upper | replace "-" "_") -}}
{{- end -}}

{{- define "mcs.natsSources" -}}
{{- toJson (ternary (list .Values.clusterName) (list) (and .Values.source true)) -}}
{{- end -}}

{{/* Permissions of one stage as JSON; call with (list $ stage). */}}
{{- define "mcs.natsPermissions" -}}
{{- $root := index . 0 -}}
{{- $stage := index . 1 -}}
{{- $p := $root.Values.subjectPrefix -}}
{{- $sources := fromJsonArray (include "mcs.natsSources" $root) | sortAlpha -}}
{{- /* every target, those the source's Targets and ClusterTargets name at runtime too */ -}}
{{- $targets := list "*" -}}
{{- if and (eq $stage "candidate-scheduler") $root.Values.candidateScheduler.serveTargets -}}
{{- $targets = $root.Values.candidateScheduler.serveTargets | sortAlpha -}}
{{- end -}}
{{- $streams := dict "watcher" (list "elect") "proxy-scheduler" (list "elect" "delegate" "dead")
      "candidate-scheduler" (list "delegate" "dead") "feedback" (list "status" "delegate" "dead") -}}
{{- $publish := list -}}
{{- range (index $streams $stage) -}}
{{- $stream := printf "%s_%s" $p . | upper | replace "-" "_" -}}
{{- $publish = concat $publish (list (printf "$JS.API.STREAM.CREATE.%s" $stream) (printf "$JS.API.STREAM.UPDATE.%s" $stream) (printf "$JS.API.STREAM.INFO.%s" $stream)) -}}
{{- end -}}
{{- $subscribe := list (printf "_INBOX.%s.>" $stage) -}}
{{- $consumers := list -}}
{{- if eq $stage "watcher" -}}
{{- range $sources -}}{{- $publish = append $publish (printf "%s.elect.%s" $p .) -}}{{- end -}}
{{- /* how far the proxy-scheduler got (the resync does not queue again what still waits there) */ -}}
{{- $publish = append $publish (printf "$JS.API.CONSUMER.INFO.%s.proxy-scheduler" (printf "%s_elect" $p | upper | replace "-" "_")) -}}
{{- else if eq $stage "proxy-scheduler" -}}
{{- $consumers = append $consumers (list "elect" "proxy-scheduler" (printf "%s.elect.>" $p)) -}}
{{- range $targets -}}{{- $publish = concat $publish (list (printf "%s.candidate.%s" $p .) (printf "%s.delegate.%s" $p .)) -}}{{- end -}}
{{- else if eq $stage "candidate-scheduler" -}}
{{- range $targets -}}
{{- $consumers = append $consumers (list "delegate" (ternary "*" (printf "candidate-scheduler-%s" .) (eq . "*")) (printf "%s.delegate.%s" $p .)) -}}
{{- $subscribe = append $subscribe (printf "%s.candidate.%s" $p .) -}}
{{- end -}}
{{- else if eq $stage "feedback" -}}
{{- range $source := $sources -}}
{{- /* a durable per partition of the source's proxies (libs/mcsched/shards.py PARTITIONS) */ -}}
{{- range $partition := until 12 -}}
{{- $consumers = append $consumers (list "status" (printf "feedback-%s-%d" $source $partition) (printf "%s.status.%s.%d" $p $source $partition)) -}}
{{- end -}}
{{- $publish = append $publish (printf "%s.status.%s.*" $p $source) -}}
{{- /* digests of each target's delegates, per partition of the source (core NATS) */ -}}
{{- $publish = append $publish (printf "%s.digest.%s.*" $p $source) -}}
{{- $subscribe = append $subscribe (printf "%s.digest.%s.*" $p $source) -}}
{{- end -}}
{{- range $targets -}}{{- $publish = append $publish (printf "%s.delegate.%s" $p .) -}}{{- end -}}
{{- end -}}
{{- range $consumers -}}
{{- $kind := index . 0 -}}{{- $durable := index . 1 -}}{{- $filter := index . 2 -}}
{{- $stream := printf "%s_%s" $p $kind | upper | replace "-" "_" -}}
{{- $publish = concat $publish (list
      (printf "$JS.API.CONSUMER.INFO.%s.%s" $stream $durable)
      (printf "$JS.API.CONSUMER.CREATE.%s.%s.%s" $stream $durable $filter)
      (printf "$JS.API.CONSUMER.MSG.NEXT.%s.%s" $stream $durable)
      (printf "$JS.ACK.%s.%s.>" $stream $durable)
      (printf "%s.dead.%s" $p $kind)) -}}
{{- end -}}
{{- if has $stage (list "watcher" "candidate-scheduler" "feedback") -}}
{{- /* the processes of a sharded stage tell each other they are alive (libs/mcsched/membership.py) */ -}}
{{- $publish = append $publish (printf "%s.members.%s" $p $stage) -}}
{{- $subscribe = append $subscribe (printf "%s.members.%s" $p $stage) -}}
{{- end -}}
{{- $permissions := dict "publish" (dict "allow" (uniq $publish)) "subscribe" (dict "allow" (uniq $subscribe)) -}}
{{- if eq $stage "candidate-scheduler" -}}{{- $_ := set $permissions "allow_responses" true -}}{{- end -}}
{{- /* toJson escapes ">" as \u003e, which nats-server does not read */ -}}
{{- toJson $permissions | replace "\\u003e" ">" -}}
{{- end -}}

{{/*
The bundled NATS's configuration: the passwords are variables the container takes from the
Secret, so an existing Secret works as well as the chart's own.
*/}}
{{- define "mcs.natsConf" -}}
# Generated by the multicluster-scheduler chart: a user per stage (docs/security.md).
authorization: {
  users: [
    {user: "admin", password: ${{ include "mcs.natsPasswordVariable" "admin" }}}
{{- range list "watcher" "proxy-scheduler" "candidate-scheduler" "feedback" }}
    {user: {{ . | quote }}, password: ${{ include "mcs.natsPasswordVariable" . }}, permissions: {{ include "mcs.natsPermissions" (list $ .) }}}
{{- end }}
  ]
}
{{- end -}}
