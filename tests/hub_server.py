"""A small Hugging Face hub on 127.0.0.1 for tests: the endpoints the real ``huggingface_hub``
client calls in ``snapshot_download`` / ``hf_hub_download`` (read from its 2.x source):

* ``GET /api/{models,datasets}/<repo>/revision/<rev>`` -> repo info (``sha``, ``siblings``)
* ``GET /api/{models,datasets}/<repo>/tree/<rev>[/<path>]?recursive=`` -> files with ``size``,
  ``oid`` and ``lfs`` (``oid`` = sha256), paginated with a ``Link: <...>; rel="next"`` header
* ``HEAD/GET /[datasets/]<repo>/resolve/<rev>/<file>``: small files answered directly (``ETag`` =
  git blob id, ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges``); LFS files redirected
  (302) to a second server on another port, as the real hub redirects to its CDN, with
  ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and ``X-Repo-Commit`` on the redirect
* the "CDN" serves blobs by sha256 with ``Range`` requests (206 + ``Content-Range``)

Errors as the hub sends them (``X-Error-Code`` / ``X-Error-Message`` headers): unknown repo 401
(no token) / 404 ``RepoNotFound``, unknown revision ``RevisionNotFound``, unknown file
``EntryNotFound``; a gated repo's files: 401 ``GatedRepo`` without a token, 403 ``GatedRepo``
for a token whose account has not accepted the conditions, plain 403 for a fine-grained token
without the "public gated repos" permission; 401 for an unknown token.

Faults per file (``server.faults[(repo_id, path)]``): ``"truncate"`` (the body stops halfway,
every time), ``"truncate_once"`` (only the first GET), ``"500"``. Every request is logged in
``server.log`` as ``(method, path, range header, authorization header)``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".parquet", ".h5", ".h5ad", ".safetensors", ".bin", ".pth", ".pt")


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    files: dict[str, bytes]
    gated: bool = False
    accepted_tokens: set[str] = field(default_factory=set)
    branch: str = "main"

    @property
    def commit(self) -> str:
        blob = json.dumps(sorted((p, hashlib.sha256(d).hexdigest()) for p, d in self.files.items())).encode()
        return hashlib.sha1(blob).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


class HubServer:
    """Start with :meth:`start`; ``endpoint`` is then ``http://127.0.0.1:<port>``."""

    def __init__(self, page_size: int = 1000) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, str] = {}  # token -> "read" | "fine-grained-no-gated"
        self.faults: dict[tuple[str, str], str] = {}
        self.log: list[tuple[str, str, str | None, str | None]] = []
        self.page_size = page_size
        self.blobs: dict[str, bytes] = {}
        self._served_once: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.hub: ThreadingHTTPServer | None = None
        self.cdn: ThreadingHTTPServer | None = None

    # -- setup -----------------------------------------------------------------------------
    def add(self, repo: Repo) -> Repo:
        self.repos[(repo.repo_type, repo.repo_id)] = repo
        for data in repo.files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return repo

    def start(self) -> HubServer:
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        for srv in (self.hub, self.cdn):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in (self.hub, self.cdn):
            if srv is not None:
                srv.shutdown()
                srv.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def gets(self, suffix: str = "") -> list[str]:
        """Paths of the GET requests that fetched file contents (resolve or CDN), in order."""
        with self._lock:
            return [p for m, p, _, _ in self.log if m == "GET" and ("/resolve/" in p or p.startswith("/blobs/"))
                    and p.endswith(suffix)]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()


def _handler(server: HubServer, cdn: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -- plumbing --------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
            self.send_response(status)
            headers = dict(headers or {})
            headers.setdefault("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, data, status: int = 200, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None,
                   head: bool = False) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

        def _log(self) -> None:
            with server._lock:
                server.log.append((self.command, urlsplit(self.path).path, self.headers.get("Range"),
                                   self.headers.get("Authorization")))

        def do_HEAD(self) -> None:
            self._log()
            self._route(head=True)

        def do_GET(self) -> None:
            self._log()
            self._route(head=False)

        # -- routing ---------------------------------------------------------------------
        def _route(self, head: bool) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            query = parse_qs(parts.query)
            if cdn:
                return self._blob(path, head)
            segs = path.strip("/").split("/")
            token = self._token()
            if token is not None and token not in server.tokens:
                return self._error(401, None, "Invalid credentials in Authorization header", head=head)
            if segs[0] == "api" and len(segs) >= 4 and segs[1] in ("models", "datasets"):
                repo_type = segs[1][:-1]
                repo_id = f"{segs[2]}/{segs[3]}"
                repo = self._repo(repo_type, repo_id, token, head)
                if repo is None:
                    return None
                if len(segs) == 4:
                    return self._info(repo, repo.branch)
                if segs[4] == "revision" and len(segs) >= 6:
                    return self._info(repo, "/".join(segs[5:]))
                if segs[4] == "tree" and len(segs) >= 6:
                    return self._tree(repo, segs[5], "/".join(segs[6:]), query)
                return self._error(404, None, "Not found")
            repo_type = "model"
            if segs[0] == "datasets":
                repo_type, segs = "dataset", segs[1:]
            if len(segs) >= 5 and segs[2] == "resolve":
                repo = self._repo(repo_type, f"{segs[0]}/{segs[1]}", token, head)
                if repo is None:
                    return None
                return self._resolve(repo, segs[3], "/".join(segs[4:]), token, head)
            return self._error(404, None, "Not found", head=head)

        def _repo(self, repo_type: str, repo_id: str, token: str | None, head: bool) -> Repo | None:
            repo = server.repos.get((repo_type, repo_id))
            if repo is None:
                self._error(401 if token is None else 404, "RepoNotFound", "Repository not found", head=head)
            return repo

        def _commit_of(self, repo: Repo, rev: str) -> str | None:
            return repo.commit if rev in (repo.branch, repo.commit) else None

        def _info(self, repo: Repo, rev: str) -> None:
            commit = self._commit_of(repo, rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            siblings = [{"rfilename": p} for p in sorted(repo.files)]
            self._json({"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                        "author": repo.repo_id.split("/")[0], "sha": commit, "private": False,
                        "gated": "manual" if repo.gated else False, "disabled": False, "siblings": siblings,
                        "lastModified": "2025-01-01T00:00:00.000Z"})

        def _tree(self, repo: Repo, rev: str, sub: str, query: dict) -> None:
            commit = self._commit_of(repo, rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            prefix = f"{sub}/" if sub else ""
            entries, dirs = [], set()
            for path in sorted(repo.files):
                if not path.startswith(prefix):
                    continue
                rest = path[len(prefix):]
                if "/" in rest:
                    parts = rest.split("/")
                    for depth in range(1, len(parts) if recursive else 2):
                        dirs.add(prefix + "/".join(parts[:depth]))
                    if not recursive:
                        continue
                data = repo.files[path]
                entry = {"type": "file", "oid": git_oid(data), "size": len(data), "path": path}
                if repo.is_lfs(path):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            entries += [{"type": "directory", "oid": git_oid(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
            entries.sort(key=lambda e: e["path"])
            start = int((query.get("cursor") or ["0"])[0])
            page = entries[start: start + server.page_size]
            headers = {}
            if start + server.page_size < len(entries):
                base = f"{server.endpoint}/api/{repo.repo_type}s/{repo.repo_id}/tree/{quote(rev, safe='')}"
                base += f"/{quote(sub)}" if sub else ""
                nxt = f"{base}?recursive={str(recursive)}&expand=False&cursor={start + server.page_size}"
                headers["Link"] = f'<{nxt}>; rel="next"'
            self._json(page, headers=headers)

        def _resolve(self, repo: Repo, rev: str, path: str, token: str | None, head: bool) -> None:
            commit = self._commit_of(repo, rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            kind = "dataset" if repo.repo_type == "dataset" else "model"
            if repo.gated:
                if token is None:
                    return self._error(401, "GatedRepo", f"Access to {kind} {repo.repo_id} is restricted. You must have "
                                       "access to it and be authenticated to access it. Please log in.", head=head)
                if server.tokens.get(token) == "fine-grained-no-gated":
                    return self._error(403, None, "Please enable access to public gated repositories in your "
                                       "fine-grained token settings to view this repository.", head=head)
                if token not in repo.accepted_tokens:
                    return self._error(403, "GatedRepo", f"Access to {kind} {repo.repo_id} is restricted and you are "
                                       f"not in the authorized list. Visit https://huggingface.co/{repo.repo_id} to "
                                       "ask for access.", head=head)
            if path not in repo.files:
                return self._error(404, "EntryNotFound", f"Entry not found: {path}", commit=commit, head=head)
            data = repo.files[path]
            if repo.is_lfs(path):
                sha = hashlib.sha256(data).hexdigest()
                return self._send(302, b"", {"Location": f"{server.cdn_endpoint}/blobs/{sha}?repo={quote(repo.repo_id)}"
                                                           f"&file={quote(path)}",
                                             "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                             "ETag": f'"{git_oid(b"pointer " + sha.encode())}"',
                                             "X-Repo-Commit": commit}, head=head)
            self._body(data, {"ETag": f'"{git_oid(data)}"', "X-Repo-Commit": commit}, head,
                       fault=server.faults.get((repo.repo_id, path)), key=(repo.repo_id, path))

        def _blob(self, path: str, head: bool) -> None:
            sha = path.rsplit("/", 1)[-1]
            if not path.startswith("/blobs/") or sha not in server.blobs:
                return self._send(404, b"no such blob", head=head)
            query = parse_qs(urlsplit(self.path).query)
            key = ((query.get("repo") or [""])[0], (query.get("file") or [""])[0])
            self._body(server.blobs[sha], {"ETag": f'"{sha}"'}, head, fault=server.faults.get(key), key=key)

        def _body(self, data: bytes, headers: dict[str, str], head: bool, fault: str | None, key) -> None:
            if not head and fault == "500":
                return self._error(500, None, "Internal Error")
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                lo, _, hi = rng[len("bytes="):].partition("-")
                start = int(lo)
                end = int(hi) if hi else len(data) - 1
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
                data_part = data[start: end + 1]
                headers["Content-Range"] = f"bytes {start}-{start + len(data_part) - 1}/{len(data)}"
                status = 206
            else:
                data_part = data
            headers.update({"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
            truncate = not head and (fault == "truncate" or (fault == "truncate_once" and key not in server._served_once))
            if truncate:
                server._served_once.add(key)
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data_part))}.items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data_part[: len(data_part) // 2])
                self.wfile.flush()
                self.close_connection = True
                return None
            self._send(status, data_part, headers, head=head)

    return Handler
