"""Start the app: ``python app.py [--host HOST] [--port PORT]``.

Serves on 127.0.0.1:7860 by default; ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``
are honoured and the flags win over them; on a Hugging Face Space (``SPACE_ID``
set) it listens on 0.0.0.0. Ctrl-C or SIGTERM (a Space restarting) stops the
running job, waits until it has saved a checkpoint, and exits; a second Ctrl-C
quits at once.
"""
import argparse
import os
import signal
import sys

from engine import Engine
from ui.app import build_app, launch_options

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_address(host: str | None = None, port: int | None = None, env=os.environ) -> tuple[str, int]:
    """Host and port: flag, else environment, else 0.0.0.0 on a Space or 127.0.0.1, and 7860."""
    host = host or env.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if env.get("SPACE_ID") else "127.0.0.1")
    port = port or int(env.get("GRADIO_SERVER_PORT") or 7860)
    return host, port


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Instruction fine-tuning GPT-2: the Gradio app.")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    args = parser.parse_args(argv)
    host, port = server_address(args.host, args.port)
    engine = Engine(loopback=host in LOOPBACK)
    signal.signal(signal.SIGTERM, interrupt)  # the way Ctrl-C goes: Gradio closes the server, then the jobs save
    try:
        build_app(engine).launch(server_name=host, server_port=port, **launch_options())
    finally:
        print("Stopping the running job, if any, and saving it; Ctrl-C again to quit without saving", file=sys.stderr)
        for message in engine.shutdown():
            print(message, file=sys.stderr)


def interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
