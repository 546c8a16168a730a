"""A Hub-compatible HTTP server on 127.0.0.1 for the tests: the endpoints huggingface_hub really calls.

create_repo (POST /api/repos/create), create_branch, README validation (POST /api/validate-yaml), upload_folder /
create_commit (POST .../preupload/{rev} answering "regular" uploads, then the NDJSON POST .../commit/{rev}), repo
info, and file download (HEAD/GET /{repo}/resolve/{rev}/{path} with ETag, X-Repo-Commit and Content-Length).
The real huggingface_hub client talks to it unpatched through HF_ENDPOINT. Repositories live in memory.

``mode = 'drop'`` makes it close every connection without answering (a server that drops the connection).
"""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

REPO = r'(?P<repo>[\w.-]+/[\w.-]+)'


class FakeHub:
    """In-memory Hub. ``repos[repo_id] = {'private': bool, 'branches': {name: {'sha', 'files'}}, 'commits': []}``."""

    def __init__(self, token: str = 'hf_test_token_never_printed'):
        self.token = token
        self.repos = {}
        self.calls = []
        self.validated_cards = []
        self.mode = 'ok'
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, 'HEAD')

            def do_GET(self):
                hub.handle(self, 'GET')

            def do_POST(self):
                hub.handle(self, 'POST')

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.endpoint = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> 'FakeHub':
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- plumbing -------------------------------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = urlparse(req.path).path
        self.calls.append((method, path))
        if self.mode == 'drop':
            req.close_connection = True
            return
        body = req.rfile.read(int(req.headers.get('Content-Length') or 0)) if method == 'POST' else b''
        authed = req.headers.get('Authorization') == f'Bearer {self.token}'
        routes = [
            ('POST', r'/api/repos/create', self.create_repo),
            ('POST', r'/api/validate-yaml', self.validate_yaml),
            ('POST', rf'/api/models/{REPO}/preupload/(?P<rev>[^/]+)', self.preupload),
            ('POST', rf'/api/models/{REPO}/commit/(?P<rev>[^/]+)', self.commit),
            ('POST', rf'/api/models/{REPO}/branch/(?P<rev>[^/]+)', self.create_branch),
            ('GET', rf'/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?', self.repo_info),
            ('HEAD', rf'/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self.resolve),
            ('GET', rf'/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self.resolve),
        ]
        for verb, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.lock:
                    status, payload, headers = fn(body=body, authed=authed, method=method, **args)
                return self.reply(req, method, status, payload, headers)
        self.reply(req, method, 404, {'error': f'no route for {method} {path}'}, {})

    @staticmethod
    def reply(req, method, status, payload, headers):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req.send_response(status)
        req.send_header('Content-Type', 'application/octet-stream' if isinstance(payload, bytes) else
                        'application/json')
        req.send_header('Content-Length', str(len(data)))
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        if method != 'HEAD':
            req.wfile.write(data)

    def _repo(self, repo, authed, write=False, rev=None):
        """(repo, branch ``rev`` or None, error reply): what the caller may not see looks missing, as on the Hub."""
        if write and not authed:
            return None, None, (401, {'error': 'Invalid credentials in Authorization header'}, {})
        entry = self.repos.get(repo)
        if entry is None or (entry['private'] and not authed):
            return None, None, (404, {'error': 'Repository not found'}, {'X-Error-Code': 'RepoNotFound'})
        if rev is not None and rev not in entry['branches']:
            return entry, None, (404, {'error': f'Invalid rev id: {rev}'}, {'X-Error-Code': 'RevisionNotFound'})
        return entry, entry['branches'].get(rev), None

    # --- endpoints ------------------------------------------------------------------------------------------------

    def create_repo(self, body, authed, **_):
        if not authed:
            return 401, {'error': 'Invalid credentials in Authorization header'}, {}
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        if repo_id in self.repos:
            return 409, {'error': 'You already created this model repo', 'url': f'{self.endpoint}/{repo_id}'}, {}
        self.repos[repo_id] = {'private': request.get('visibility') == 'private',
                               'branches': {'main': {'sha': hashlib.sha1(repo_id.encode()).hexdigest(), 'files': {}}},
                               'commits': []}
        return 200, {'url': f'{self.endpoint}/{repo_id}', 'name': repo_id}, {}

    def validate_yaml(self, body, **_):
        """The checks the Hub applies to a model card's metadata that matter here."""
        content = json.loads(body)['content']
        errors = []
        match = re.match(r'^---\n(.*?)\n---\n', content, flags=re.S)
        meta = yaml.safe_load(match.group(1)) if match else None
        if not isinstance(meta, dict):
            errors.append('metadata must be a YAML mapping between --- lines')
        else:
            for key in ('library_name', 'license', 'pipeline_tag'):
                if key in meta and not isinstance(meta[key], str):
                    errors.append(f'"{key}" must be a string')
            for key in ('tags', 'datasets'):
                if key in meta and not (isinstance(meta[key], list) and all(isinstance(t, str) for t in meta[key])):
                    errors.append(f'"{key}" must be a list of strings')
            for entry in meta.get('model-index', []) or []:
                for result in entry.get('results', []):
                    if not {'task', 'dataset', 'metrics'} <= set(result):
                        errors.append('"model-index" results need task, dataset and metrics')
                    for metric in result.get('metrics', []):
                        if not isinstance(metric.get('value'), (int, float)) or 'type' not in metric:
                            errors.append('"model-index" metrics need a type and a numeric value')
        self.validated_cards.append(content)
        return (400, {'errors': [{'message': e} for e in errors]}, {}) if errors else (200, {'warnings': []}, {})

    def preupload(self, repo, rev, body, authed, **_):
        _, _, error = self._repo(repo, authed, write=True)
        if error:
            return error
        files = json.loads(body)['files']
        return 200, {'files': [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]}, {}

    def commit(self, repo, rev, body, authed, **_):
        entry, branch, error = self._repo(repo, authed, write=True, rev=rev)
        if error:
            return error
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item['value'] for item in lines if item['key'] == 'header')
        for item in lines:
            if item['key'] == 'file':
                branch['files'][item['value']['path']] = base64.b64decode(item['value']['content'])
            elif item['key'] in ('deletedFile', 'deletedFolder'):
                branch['files'].pop(item['value']['path'], None)
            elif item['key'] == 'lfsFile':
                return 400, {'error': 'this test server only takes regular uploads'}, {}
        branch['sha'] = hashlib.sha1((branch['sha'] + body.decode()).encode()).hexdigest()
        entry['commits'].append({'branch': rev, 'sha': branch['sha'], 'summary': header['summary']})
        return 200, {'commitUrl': f'{self.endpoint}/{repo}/commit/{branch["sha"]}', 'commitOid': branch['sha']}, {}

    def create_branch(self, repo, rev, authed, **_):
        entry, _, error = self._repo(repo, authed, write=True)
        if error:
            return error
        if rev in entry['branches']:
            return 409, {'error': f'Reference already exists: refs/heads/{rev}'}, {}
        main = entry['branches']['main']
        entry['branches'][rev] = {'sha': main['sha'], 'files': dict(main['files'])}
        return 200, {}, {}

    def repo_info(self, repo, authed, rev='main', **_):
        entry, branch, error = self._repo(repo, authed, rev=rev)
        if error:
            return error
        return 200, {'id': repo, 'modelId': repo, 'sha': branch['sha'], 'private': entry['private'],
                     'siblings': [{'rfilename': name} for name in sorted(branch['files'])]}, {}

    def resolve(self, repo, rev, file, authed, **_):
        _, branch, error = self._repo(repo, authed, rev=rev)
        if error:
            return error
        if file not in branch['files']:
            return 404, {'error': 'Entry not found'}, {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': branch['sha']}
        data = branch['files'][file]
        return 200, data, {'ETag': f'"{hashlib.sha256(data).hexdigest()}"', 'X-Repo-Commit': branch['sha']}
