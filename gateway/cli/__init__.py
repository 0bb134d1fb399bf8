"""The `loragate` command line: `main.py` parses it, `serve.py` and `admin_client.py` run it."""
