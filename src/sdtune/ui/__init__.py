"""``sdtune ui``: the whole workflow in a browser (a local Gradio app over the Python API).

    from sdtune.ui import serve
    serve(model="tiny", out="outputs", port=7860)      # blocks; Ctrl+C stops it and its training jobs

Modules: ``guard`` (which paths and uploads a request may use), ``jobs`` (training processes and their
queue), ``trainform`` (the training forms, from the settings dataclasses), ``studio`` (what each button does,
through the API), ``app`` (the page layout). Gradio is imported only here and in ``app``, so the rest of
sdtune does not need it.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import time

from ..console import note
from ..safeio import SdtuneError, input_path
from .guard import Folders

LOCAL, ALL = "127.0.0.1", "0.0.0.0"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'USER:PASS' -> (user, password)."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SdtuneError("--auth: write USER:PASS, e.g. --auth me:a-long-password")
    return user, password


def _quiet_environment(folders: Folders) -> None:
    """No network and no files outside the configured folders, whatever Gradio's defaults: no analytics or
    version check, uploads cached inside the output folder, the model hub not asked (local files only)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(folders.out / ".cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def serve(model: str = "tiny", *, out: str = "outputs", lora_dir: str | None = None, embedding_dir: str | None = None,
          model_dir: str | None = None, port: int = 7860, listen: bool = False, auth: str | None = None, device: str | None = None,
          dtype: str | None = None, max_upload_mb: float = 512, vae: str | None = None, block: bool = True):
    """Start the web UI; with ``block=False`` return (app, studio) with the server running in a thread."""
    credentials = parse_auth(auth)
    if not 0 < port < 65536:
        raise SdtuneError(f"--port {port}: use a port between 1 and 65535, e.g. 7860")
    if not 0 < max_upload_mb < float("inf"):
        raise SdtuneError(f"--max-upload-mb {max_upload_mb}: must be a size in MB greater than 0, e.g. 512")
    if not (model in ("tiny", "tiny-xl") or model.endswith("-random")) and os.path.exists(model):
        model = os.path.abspath(os.path.expanduser(model))  # the server changes folder below
    if vae is not None:  # absolute: the server changes folder below
        vae = str(input_path(vae, "VAE file or folder", "--vae").resolve())
    folders = Folders.make(out, lora_dir, embedding_dir, model, model_dir)
    _quiet_environment(folders)
    # relative paths the API resolves (a prompt's <lora:name>) must land in the output folder, never in the
    # folder the server happened to be started from; a server that does not start gives the folder back
    started_in = os.getcwd()
    os.chdir(folders.out)
    try:
        return _start(folders, model, credentials, port=port, listen=listen, device=device, dtype=dtype,
                      max_upload_mb=max_upload_mb, vae=vae, block=block)
    except BaseException:
        os.chdir(started_in)
        raise


def _start(folders: Folders, model: str, credentials, *, port: int, listen: bool, device, dtype, max_upload_mb: float,
           vae, block: bool):
    import gradio as gr  # noqa: E402 - after the environment above, which Gradio reads on import

    from .app import CSS, build
    from .studio import Studio

    studio = Studio(folders, model=model, device=device, dtype=dtype, max_upload_mb=max_upload_mb, vae=vae)
    app = build(studio)
    host = ALL if listen else LOCAL
    if listen and credentials is None:
        note("--listen without --auth: anyone who can reach this machine can use the UI, read its outputs and "
             "start training; add --auth USER:PASS")
    try:
        app.queue().launch(server_name=host, server_port=port, auth=credentials, quiet=True, ssr_mode=False,
                           prevent_thread_lock=True, allowed_paths=[str(folders.out)], show_error=False,
                           max_file_size=int(max_upload_mb * 2**20), enable_monitoring=False, mcp_server=False,
                           pwa=False, footer_links=[], css=CSS,
                           theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace",
                                                                                                 "monospace"]))
    except OSError as e:
        studio.jobs.shutdown()
        reason = str(e).splitlines()[0].split(". ")[0]  # Gradio's own advice after it names launch()'s options
        raise SdtuneError(f"cannot serve on {host}:{port} ({reason}); is another server using it? pass --port") \
            from None
    print(f"sdtune ui: http://{host}:{port}  (model {model}, output folder {folders.out}; Ctrl+C stops it)",
          flush=True)
    if not block:
        return app, studio
    # `kill` (SIGTERM) stops the server like Ctrl+C does: its training jobs are stopped too, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        studio.jobs.shutdown()
        with contextlib.redirect_stdout(io.StringIO()):  # Gradio's "Closing server running on port: N"
            app.close()
