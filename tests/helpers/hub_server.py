"""A Hub-compatible HTTP server on 127.0.0.1 for the tests: the endpoints huggingface_hub really calls.

whoami (GET /api/whoami-v2), create_repo (POST /api/repos/create), create_branch, README validation (POST
/api/validate-yaml), upload_folder / create_commit (POST .../preupload/{rev} answering "regular" uploads, then the
NDJSON POST .../commit/{rev}), repo info, file download (HEAD/GET /{repo}/resolve/{rev}/{path} with ETag,
X-Repo-Commit and Content-Length), list_models (GET /api/models: filter, author, search, sort, limit, expand), and
collections (create_collection, get_collection, add_collection_item). The real huggingface_hub client talks to it
unpatched through HF_ENDPOINT. Repositories live in memory.

As on the Hub, a model's tags are its card's tags plus ones the Hub derives from the card (library, ``dataset:X``,
``base_model:X``, ``license:X``), and each GET of its config.json counts one download. Commits advance a fake clock
by one minute, so ``lastModified`` orders pushes deterministically.

``mode = 'drop'`` makes it close every connection without answering (a server that drops the connection).
"""
import base64
import hashlib
import json
import re
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

REPO = r'(?P<repo>[\w.-]+/[\w.-]+)'
SLUG = r'(?P<slug>[\w.-]+/[\w.-]+)'
EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)
SORT_KEYS = {'downloads': 'downloads', 'lastModified': 'modified', 'createdAt': 'created', 'likes': 'likes'}


class FakeHub:
    """In-memory Hub. ``repos[repo_id] = {'private': bool, 'branches': {name: {'sha', 'files'}}, 'commits': [],
    'downloads': int, 'likes': int, 'created': str, 'modified': str}``; ``collections[slug]`` as the Hub returns it."""

    def __init__(self, token: str = 'hf_test_token_never_printed'):
        self.token = token
        self.repos = {}
        self.collections = {}
        self.calls = []
        self.listings = []  # the query of each GET /api/models, parsed
        self.clock = 0
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

    def put(self, repo_id: str, files: dict) -> None:
        """A public repository holding ``files`` (name -> bytes) on main: a state no client here would push."""
        now, sha = self.tick(), hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = {'private': False, 'branches': {'main': {'sha': sha, 'files': dict(files)}},
                               'commits': [], 'downloads': 0, 'likes': 0, 'created': now, 'modified': now}

    # --- plumbing -------------------------------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path, query = urlparse(req.path).path, parse_qs(urlparse(req.path).query)
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
            ('GET', r'/api/models', self.list_models),
            ('GET', r'/api/whoami-v2', self.whoami),
            ('GET', rf'/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?', self.repo_info),
            ('POST', r'/api/collections', self.create_collection),
            ('GET', rf'/api/collections/{SLUG}', self.get_collection),
            ('POST', rf'/api/collections/{SLUG}/items', self.add_collection_item),
            ('HEAD', rf'/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self.resolve),
            ('GET', rf'/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self.resolve),
        ]
        for verb, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.lock:
                    status, payload, headers = fn(body=body, authed=authed, method=method, query=query, **args)
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

    def tick(self) -> str:
        """The fake clock's next time, as the Hub writes dates."""
        self.clock += 1
        return (EPOCH + timedelta(minutes=self.clock)).strftime('%Y-%m-%dT%H:%M:%S.000Z')

    @staticmethod
    def card_metadata(entry) -> dict:
        """The YAML front matter of the main branch's README.md ({} without one)."""
        readme = entry['branches']['main']['files'].get('README.md', b'').decode()
        match = re.match(r'^---\n(.*?)\n---\n', readme, flags=re.S)
        meta = yaml.safe_load(match.group(1)) if match else None
        return meta if isinstance(meta, dict) else {}

    def tags(self, entry) -> list:
        """The card's tags, then those the Hub derives from its metadata."""
        meta = self.card_metadata(entry)
        derived = [meta.get('library_name')] + [f'dataset:{d}' for d in meta.get('datasets') or []]
        derived += [f'base_model:{meta["base_model"]}' if meta.get('base_model') else None]
        derived += [f'license:{meta["license"]}' if meta.get('license') else None]
        return list(dict.fromkeys(t for t in (meta.get('tags') or []) + derived if t))

    # --- endpoints ------------------------------------------------------------------------------------------------

    def create_repo(self, body, authed, **_):
        if not authed:
            return 401, {'error': 'Invalid credentials in Authorization header'}, {}
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        if repo_id in self.repos:
            return 409, {'error': 'You already created this model repo', 'url': f'{self.endpoint}/{repo_id}'}, {}
        now = self.tick()
        self.repos[repo_id] = {'private': request.get('visibility') == 'private',
                               'branches': {'main': {'sha': hashlib.sha1(repo_id.encode()).hexdigest(), 'files': {}}},
                               'commits': [], 'downloads': 0, 'likes': 0, 'created': now, 'modified': now}
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
        entry['modified'] = self.tick()
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

    def whoami(self, authed, **_):
        """Who the token belongs to (what ``--push-to-hub`` asks before training); 401 for another token."""
        if not authed:
            return 401, {'error': 'Invalid credentials in Authorization header'}, {}
        return 200, {'type': 'user', 'name': 'icd-tests', 'orgs': []}, {}

    def repo_info(self, repo, authed, rev='main', **_):
        entry, branch, error = self._repo(repo, authed, rev=rev)
        if error:
            return error
        return 200, {'id': repo, 'modelId': repo, 'sha': branch['sha'], 'private': entry['private'],
                     'siblings': [{'rfilename': name} for name in sorted(branch['files'])]}, {}

    def resolve(self, repo, rev, file, authed, method, **_):
        _, branch, error = self._repo(repo, authed, rev=rev)
        if error:
            return error
        if file not in branch['files']:
            return 404, {'error': 'Entry not found'}, {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': branch['sha']}
        data = branch['files'][file]
        if method == 'GET' and file == 'config.json':
            self.repos[repo]['downloads'] += 1
        return 200, data, {'ETag': f'"{hashlib.sha256(data).hexdigest()}"', 'X-Repo-Commit': branch['sha']}

    def model_json(self, repo, entry, expand) -> dict:
        """A model as GET /api/models lists it: the default fields, or with ``expand`` only those asked for."""
        meta = self.card_metadata(entry)
        fields = {'author': repo.split('/')[0], 'private': entry['private'], 'downloads': entry['downloads'],
                  'likes': entry['likes'], 'tags': self.tags(entry), 'library_name': meta.get('library_name'),
                  'pipeline_tag': meta.get('pipeline_tag'), 'createdAt': entry['created'],
                  'lastModified': entry['modified'], 'sha': entry['branches']['main']['sha'], 'cardData': meta}
        keys = expand or ['author', 'private', 'downloads', 'likes', 'tags', 'library_name', 'pipeline_tag',
                          'createdAt']
        return {'_id': hashlib.sha1(repo.encode()).hexdigest()[:24], 'id': repo, 'modelId': repo,
                **{k: fields[k] for k in keys if k in fields and fields[k] is not None}}

    def list_models(self, query, authed, **_):
        """GET /api/models: every ``filter`` value among the tags, ``author``, ``search`` in the id; sorted
        descending, at most ``limit``. Private repositories are listed for the token (which owns them all)."""
        self.listings.append(query)
        one = {key: values[-1] for key, values in query.items()}
        found = [(repo, entry) for repo, entry in sorted(self.repos.items())
                 if (authed or not entry['private'])
                 and set(query.get('filter', [])) <= set(self.tags(entry))
                 and one.get('author', repo.split('/')[0]) == repo.split('/')[0]
                 and one.get('search', '').lower() in repo.lower()]
        if one.get('sort'):
            if one['sort'] not in SORT_KEYS:
                return 400, {'error': f"Invalid sort: {one['sort']}"}, {}
            found.sort(key=lambda item: item[1][SORT_KEYS[one['sort']]], reverse=True)
        found = found[:int(one.get('limit', len(found)))]
        return 200, [self.model_json(repo, entry, query.get('expand')) for repo, entry in found], {}

    # --- collections ----------------------------------------------------------------------------------------------

    def collection_json(self, slug) -> dict:
        return {**self.collections[slug], 'items': [dict(item) for item in self.collections[slug]['items']]}

    def create_collection(self, body, authed, **_):
        if not authed:
            return 401, {'error': 'Invalid credentials in Authorization header'}, {}
        request = json.loads(body)
        title = re.sub(r'[^a-z0-9]+', '-', request['title'].lower()).strip('-')
        slug = f"{request['namespace']}/{title}-{hashlib.sha1(request['title'].encode()).hexdigest()[:24]}"
        if slug in self.collections:
            return 409, {'error': 'Collection already exists', 'slug': slug}, {}
        self.collections[slug] = {
            'slug': slug, 'title': request['title'], 'owner': {'name': request['namespace'], 'type': 'org'},
            'items': [], 'lastUpdated': self.tick(), 'position': 0, 'private': bool(request.get('private')),
            'theme': 'indigo', 'upvotes': 0, 'description': request.get('description')}
        return 200, self.collection_json(slug), {}

    def get_collection(self, slug, authed, **_):
        collection = self.collections.get(slug)
        if collection is None or (collection['private'] and not authed):
            return 404, {'error': 'Collection not found'}, {}
        return 200, self.collection_json(slug), {}

    def add_collection_item(self, slug, body, authed, **_):
        if not authed:
            return 401, {'error': 'Invalid credentials in Authorization header'}, {}
        collection = self.collections.get(slug)
        if collection is None:
            return 404, {'error': 'Collection not found'}, {}
        item = json.loads(body)['item']
        if item['type'] == 'model' and item['id'] not in self.repos:
            return 404, {'error': f"Repository not found: {item['id']}"}, {}
        if any(i['id'] == item['id'] and i['type'] == item['type'] for i in collection['items']):
            return 409, {'error': 'Item already in the collection'}, {}
        collection['items'].append({'_id': hashlib.sha1(f"{slug}{item['id']}".encode()).hexdigest()[:24],
                                    'id': item['id'], 'type': item['type'], 'position': len(collection['items'])})
        collection['lastUpdated'] = self.tick()
        return 200, self.collection_json(slug), {}
