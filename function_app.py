"""Azure Functions entry point: thin wiring over `detector`.

One ASGI function serves the whole HTTP API under /api, and one Event Grid blob trigger scores
billing exports dropped into `batch-in`. Everything else lives in the `detector` package.

The HTTP function's auth level is FUNCTION (the host checks a function key) unless built-in
authentication is on for this app (detected from the platform's own variables) and the app
setting PTD_REQUIRE_FUNCTION_KEY is false: then ANONYMOUS, the Entra ID token alone
(`detector.identity.http_auth_level`; docs/API.md, "Authentication").
"""

from __future__ import annotations

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob

from detector.api import create_app
from detector.config import Settings
from detector.identity import http_auth_level
from detector.telemetry import observe_blob_run

settings = Settings.from_env()
app = func.AsgiFunctionApp(
    app=create_app(settings),
    http_auth_level=func.AuthLevel[
        http_auth_level(settings.require_function_key, settings.platform_auth)
    ],
)


@app.function_name("score_batch_blob")
@app.blob_trigger(
    arg_name="client",
    path="batch-in/{name}",
    connection="STORAGE",
    source=func.BlobSource.EVENT_GRID,
)
def score_batch_blob(client: blob.BlobClient) -> None:
    """Score one billing export; results, summary and rejects go to `batch-out`.

    Traced and audited (detector.telemetry.observe_blob_run): a correlation id per run, the
    `batch_failed` event when it fails (then the exception reaches the host, which retries)."""
    # Imported here: batch scoring needs pandas and pyarrow, which HTTP cold starts do without.
    from detector.blob_batch import process_blob

    observe_blob_run(str(client.blob_name), lambda: process_blob(client, settings))
