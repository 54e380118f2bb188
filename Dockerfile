# Container image of the app for hosts other than Flex Consumption (Azure Container Apps, a
# utility's own servers): the same function_app.py, run by the Azure Functions host of
# Microsoft's Python 3.11 base image, with the bundled model (PTD_MODEL_SOURCE=local by default;
# set PTD_MODEL_SOURCE=blob and the STORAGE__* connection to follow the models container).
# Runtime dependencies only (requirements.txt), no dev tools; runs as an unprivileged user on
# port 8080. Function keys: see docs/DEPLOYMENT_GUIDE.md, "Container image".
# https://learn.microsoft.com/azure/azure-functions/functions-how-to-custom-container
FROM mcr.microsoft.com/azure-functions/python:4-python3.11

ENV AzureWebJobsScriptRoot=/home/site/wwwroot \
    AzureFunctionsJobHost__Logging__Console__IsEnabled=true \
    ASPNETCORE_URLS=http://+:8080 \
    PTD_MODEL_SOURCE=local \
    PTD_MODEL_CACHE_DIR=/tmp/ptd-models \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY host.json function_app.py /home/site/wwwroot/
COPY detector /home/site/wwwroot/detector
COPY models_artifacts /home/site/wwwroot/models_artifacts
COPY container/healthcheck.py /usr/local/lib/ptd/healthcheck.py

# The app files stay root-owned and read-only to the service user; it writes only to /tmp and to
# its home (the host's file-based keys, FUNCTIONS_SECRETS_PATH, when used).
RUN groupadd --system --gid 10001 ptd \
    && useradd --system --uid 10001 --gid ptd --create-home --home-dir /home/ptd ptd \
    && mkdir -p /home/ptd/secrets \
    && chown ptd:ptd /home/ptd/secrets

ENV HOME=/home/ptd
USER 10001:10001
EXPOSE 8080

# Healthy when /api/health answers 200 "ok" (the model is loaded and verified), asked with the
# host key from the file-based key store when there is one (docs/DEPLOYMENT_GUIDE.md).
HEALTHCHECK --interval=30s --timeout=10s --start-period=90s --retries=3 \
    CMD ["python", "/usr/local/lib/ptd/healthcheck.py"]
