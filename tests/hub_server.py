"""A local stand-in for the Hugging Face Hub endpoints that ``create_repo`` and ``upload_folder`` call."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.auth: list[str] = []
        self.unhandled: list[str] = []
        self.validated: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _json(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.auth.append(self.headers.get("Authorization", ""))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'user'}/{req['name']}"
                    hub.repos[repo] = req
                    return self._json(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":  # the hub checks a README's front matter before a commit
                    hub.validated.append(json.loads(body))
                    return self._json(200, {"errors": [], "warnings": []})
                parts = path.strip("/").split("/")  # api/models/OWNER/NAME/{preupload,commit}/REV
                if len(parts) == 6 and parts[:2] == ["api", "models"]:
                    repo, action = f"{parts[2]}/{parts[3]}", parts[4]
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                           "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        store = hub.files.setdefault(repo, {})
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                v = item["value"]
                                store[v["path"]] = base64.b64decode(v["content"])
                        return self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc123",
                                                "commitOid": "abc123", "success": True})
                hub.unhandled.append(f"POST {self.path}")
                self._json(404, {"error": f"fake hub: no route POST {self.path}"})

            def do_GET(self):
                hub.unhandled.append(f"GET {self.path}")
                self._json(404, {"error": f"fake hub: no route GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
