# One image for the four services. The service is the module given as the command:
#   docker run multicluster-scheduler services.proxy_scheduler
# (services.watcher, services.proxy_scheduler, services.candidate_scheduler, services.feedback).
# Settings come from the file named by MCS_CONFIG and MCS_* variables (docs/configuration.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A normal (non-editable) install of the project; the sources are removed afterwards so
# `python -m services.<name>` imports the installed packages, not a copy in the working directory.
COPY pyproject.toml README.md /tmp/src/
COPY libs/ /tmp/src/libs/
COPY services/ /tmp/src/services/
RUN pip install --no-cache-dir /tmp/src \
    && rm -rf /tmp/src

# /run/secrets/nats and /run/secrets/webhook are owned by the service user so that a new volume
# mounted there (the compose stack's NATS credentials, its webhook certificate) starts with that
# ownership and `mcsctl nats-config` / `mcsctl webhook-certificate` can write it.
RUN groupadd --gid 10001 mcs \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mcs \
    && mkdir -p /run/secrets/nats /run/secrets/webhook \
    && chown 10001:10001 /run/secrets/nats /run/secrets/webhook
# Numeric, so runtimes enforcing runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/mcs

# 8443: the watcher's admission webhook; 9090: /metrics, /healthz and /readyz (metrics_port).
EXPOSE 8443 9090

ENTRYPOINT ["python", "-m"]
CMD ["services.watcher"]
