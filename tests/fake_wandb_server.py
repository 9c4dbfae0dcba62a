"""A tiny stand-in for a W&B server, enough for `wandb sync` of offline runs (wandb 0.31).

    with FakeWandbServer() as server:      # http://127.0.0.1:PORT in a thread
        subprocess.run(["wandb", "sync", *folders], env={..., **server.env(home)})
        server.history("RUN_ID")           # history rows as stored, in file-stream order
        server.artifacts, server.used      # created artifacts; names of the artifacts used

It answers the GraphQL operations and HTTP calls wandb-core's sync makes (run upsert, resume
status, file stream, run files, artifact create/manifest/files/commit/use) and stores what it is
sent, the way the real server would for these fields: the file stream writes lines at the
offset the client gives (so a resumed segment synced at offset 0 would overwrite, not append),
and the resume status reports how many history lines a run already has. Anything else is
recorded in `unknown` and answered with empty data (a test then sees it). No real server can run
here (W&B's local server needs Docker).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeWandbServer:
    def __init__(self):
        self.lock = threading.Lock()
        self.runs: dict[str, dict] = {}  # run id -> {"files": {name: [lines]}, "config": str}
        self.artifacts: list[dict] = []  # {"id", "name", "type", "aliases", "committed"}
        self.used: list[str] = []  # names of artifacts marked as used by a run
        self.uploads: dict[str, bytes] = {}  # upload path -> bytes
        self.unknown: list[str] = []
        self.queries: dict[str, str] = {}  # operation name -> its GraphQL text (debugging)
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.http.shutdown()
        self.http.server_close()

    def env(self, home) -> dict:
        return {"WANDB_BASE_URL": self.url, "WANDB_API_KEY": "f" * 40, "HOME": str(home),
                "WANDB_MODE": "online"}

    def history(self, run_id: str) -> list[dict]:
        lines = self.runs.get(run_id, {}).get("files", {}).get("wandb-history.jsonl", [])
        return [json.loads(line) for line in lines]

    # ---- GraphQL ------------------------------------------------------------------------
    def graphql(self, op: str, v: dict) -> dict:
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            self.unknown.append(op)
            return {}
        try:
            with self.lock:
                return handler(v)
        except (KeyError, StopIteration, TypeError) as e:  # a request shaped unlike expected
            self.unknown.append(f"{op}: {type(e).__name__} {e} in {json.dumps(v)[:300]}")
            return {}

    def op_ServerFeaturesQuery(self, v):
        return {"serverInfo": {"features": []}}

    def op_UpsertBucket(self, v):
        run = self.runs.setdefault(v["name"], {"files": {}})
        run["config"] = v.get("config") or run.get("config")
        return {"upsertBucket": {"inserted": True, "bucket": {
            "id": f"run-{v['name']}", "name": v["name"], "displayName": v.get("displayName"),
            "sweepName": None, "historyLineCount": 0,
            "project": {"id": "p1", "name": v.get("project") or "proj",
                        "entity": {"id": "e1", "name": v.get("entity") or "me"}}}}}

    def op_RunResumeStatus(self, v):
        project = {"id": "p1", "name": v.get("project"), "entity": {"id": "e1", "name": "me"}}
        run = self.runs.get(v["name"])
        if run is None:
            return {"model": {**project, "bucket": None}}
        files = run["files"]
        history = files.get("wandb-history.jsonl", [])
        project["bucket"] = {
            "id": f"run-{v['name']}", "name": v["name"], "displayName": v["name"],
            "summaryMetrics": "{}", "config": "{}", "tags": [], "notes": None,
            "historyLineCount": len(history), "historyTail": json.dumps(history[-1:]),
            "eventsLineCount": len(files.get("wandb-events.jsonl", [])), "eventsTail": "[]",
            "logLineCount": len(files.get("output.log", [])),
            "wandbConfig": json.dumps({"t": {}})}  # wandb-core: a run "exists" when it has t
        return {"model": project}

    def op_CreateRunFiles(self, v):
        return {"createRunFiles": {"runID": f"run-{v['run']}", "uploadHeaders": [], "files": [
            {"name": f, "uploadUrl": f"{self.url}/upload/run/{v['run']}/{f}"}
            for f in v["files"]]}}

    def op_CreateArtifact(self, v):
        i = v["input"]
        artifact = {"id": f"art-{len(self.artifacts)}", "name": i["artifactCollectionName"],
                    "type": i["artifactTypeName"], "committed": False,
                    "aliases": sorted(a["alias"] for a in i.get("aliases") or [])}
        self.artifacts.append(artifact)
        return {"createArtifact": {"artifact": {"id": artifact["id"], "state": "PENDING",
                                                "artifactSequence": {"latestArtifact": None}}}}

    def manifest(self, artifact_id: str) -> dict:
        return {"artifactManifest": {"id": f"man-{artifact_id}", "file": {
            "id": f"file-{artifact_id}", "uploadHeaders": [],
            "uploadUrl": f"{self.url}/upload/manifest/{artifact_id}"}}}

    def op_CreateArtifactManifest(self, v):
        return {"createArtifactManifest": self.manifest(v["artifactID"])}

    def op_UpdateArtifactManifest(self, v):
        return {"updateArtifactManifest": self.manifest(v["artifactManifestID"][4:])}

    def op_CreateArtifactFiles(self, v):
        edges = [{"node": {
            "storagePath": f"{f['artifactID']}/{f['name']}", "uploadHeaders": [],
            "uploadUrl": f"{self.url}/upload/artifact/{f['artifactID']}/{f['name']}",
            "uploadMultipartUrls": None, "artifact": {"id": f["artifactID"]}}}
            for f in v["input"]["artifactFiles"]]
        return {"createArtifactFiles": {"files": {"edges": edges}}}

    def op_CommitArtifact(self, v):
        artifact = self.by_id(v["artifactID"])
        artifact["committed"] = True
        return {"commitArtifact": {"artifact": {"id": artifact["id"], "digest": "d"}}}

    def op_UseArtifact(self, v):
        artifact = self.by_id(v["input"]["artifactID"])
        self.used.append(artifact["name"])
        return {"useArtifact": {"artifact": {"id": artifact["id"]}}}

    def by_id(self, artifact_id: str) -> dict:
        return next(a for a in self.artifacts if a["id"] == artifact_id)

    # ---- file stream and uploads ------------------------------------------------------
    def file_stream(self, run_id: str, body: dict) -> None:
        with self.lock:
            files = self.runs.setdefault(run_id, {"files": {}})["files"]
            for name, chunk in (body.get("files") or {}).items():
                lines, offset = files.setdefault(name, []), chunk["offset"]
                lines[offset:offset + len(chunk["content"])] = chunk["content"]

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def reply(self, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                server.uploads[self.path] = self.body()
                self.reply({})

            def do_POST(self):
                raw = self.body()
                if self.path.endswith("/file_stream"):  # /files/ENTITY/PROJECT/RUN/file_stream
                    server.file_stream(self.path.split("/")[-2], json.loads(raw))
                    return self.reply({})
                if self.path.startswith("/sdk/otel/"):  # wandb's own telemetry
                    return self.reply({})
                if self.path != "/graphql":
                    server.unknown.append(f"POST {self.path}")
                    return self.reply({})
                request = json.loads(raw)
                op = request.get("operationName") or ""
                server.queries[op] = request.get("query", "")
                self.reply({"data": server.graphql(op, request.get("variables") or {})})

            def do_GET(self):
                server.unknown.append(f"GET {self.path}")
                self.reply({})

        return Handler
