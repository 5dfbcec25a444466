// A real OAuth 2.0 authorization server for the end-to-end tests: panva's
// oidc-provider, configured to issue RFC 8705 certificate-bound (and unbound)
// ES256 JWT access tokens with the client_credentials grant, plus opaque
// tokens, introspection, revocation and DPoP; and an OpenID Provider for a
// relying party's browser login (authorization code flow, PKCE S256 required).
//
// Usage: node launcher.mjs CONFIG   (CONFIG: a JSON file path, or inline JSON)
//
//   {
//     "host": "127.0.0.1", "port": 0,          // 0: any free port
//     "issuer": "https://127.0.0.1:PORT",      // default: built from host and the bound port
//     "tls": {"cert": "...", "key": "...", "client_ca": "..."},  // client_ca: for tls_client_auth
//     "keys": "path/to/private-jwks.json",     // ES256 signing keys; generated here when missing
//     "access_token_ttl": 600,
//     "clients": [
//       {"client_id": "bound", "auth": "self_signed_tls_client_auth", "certificates": ["a.pem"], "bound": true},
//       {"client_id": "bound-dn", "auth": "tls_client_auth", "subject_dn": "CN=alice", "bound": true},
//       {"client_id": "unbound", "auth": "client_secret_basic", "secret": "..."},
//       {"client_id": "rs-client", "auth": "client_secret_basic", "secret": "...", "introspect": true},
//       {"client_id": "rs-jwt", "auth": "private_key_jwt", "jwks": {"keys": [...]}, "introspect": true},
//       {"client_id": "rs-jwks", "auth": "private_key_jwt", "jwks_uri": "https://...", "introspect": true},
//       {"client_id": "rs-mtls", "auth": "tls_client_auth", "subject_dn": "CN=rs-mtls", "introspect": true},
//       {"client_id": "web-client", "auth": "client_secret_basic", "secret": "...", "code": true,
//        "redirect_uris": ["https://127.0.0.1:8443/callback"]}
//     ],
//     "verbose": false
//   }
//
// A private_key_jwt client's "jwks" is its JWKS, inline or as a file path;
// only the public members of its keys are registered. With "jwks_uri"
// instead, the provider downloads the client's keys from there (and again,
// at most once a minute, when an assertion names a kid it does not hold);
// NODE_EXTRA_CA_CERTS must then name the CA of that server. Its client
// assertions may name as "aud" the endpoint's URL, the issuer or the token
// endpoint.
//
// Prints exactly one line, "READY <port>", on stdout once it serves requests.
// Everything it listens on is the given loopback address; it makes no outgoing
// requests but to a client's jwks_uri. Besides the provider's own routes it serves GET /__stats
// ({"tokens", "introspections", "revocations", "jwks"}: requests received),
// POST /__stats/reset and PUT /__clients/<client_id>/redirect_uris (a JSON
// array: the client's redirect URIs from now on, no restart), and answers
// /.well-known/oauth-authorization-server with the provider's discovery document.
//
// The browser login: a "code" client gets grant_types [authorization_code] and
// response_types [code]; every authorization request needs PKCE (S256). The
// provider's own development interactions ask for any login name and any
// password (the account is that name, its e-mail <name>@example.test), then
// for consent. Access tokens from the code flow are ES256 JWTs for the
// resource granted (https://api.test unless the request names another), so
// the ID token carries the profile and email claims (userinfo is not usable
// with such a token).
//
// oidc-provider neither stores nor introspects JWT access tokens
// ("Structured JWT Tokens cannot be introspected"). So that a resource server
// can introspect them like opaque ones, the launcher keeps a copy of every JWT
// access token it issues, under its jti, and hands introspection and
// revocation a JWT as that jti, but only when the JWT is byte for byte one it
// issued. The provider itself still authenticates the caller and applies the
// policy; revoking a JWT makes it introspect as inactive.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as querystring from 'node:querystring';

const config = JSON.parse(
  process.argv[2]?.trimStart().startsWith('{') ? process.argv[2] : fs.readFileSync(process.argv[2], 'utf8'),
);
const verbose = !!config.verbose;

// oidc-provider prints development notices with console.info (stdout) and
// console.warn (stderr), some of them at import time. Keep stdout for the
// READY line alone; keep stderr for real errors.
const stderr = (...args) => process.stderr.write(`${args.map(String).join(' ')}\n`);
console.log = verbose ? stderr : () => {};
console.info = verbose ? stderr : () => {};
console.warn = verbose ? stderr : () => {};
console.error = stderr;

const { default: Provider, errors } = await import('oidc-provider');

const host = config.host ?? '127.0.0.1';
const stats = { tokens: 0, introspections: 0, revocations: 0, jwks: 0 };
const ROUTES = {
  token: '/token',
  introspection: '/token/introspection',
  revocation: '/token/revocation',
  jwks: '/jwks',
};

// ----- signing keys -------------------------------------------------------

function loadKeys(path) {
  if (!fs.existsSync(path)) {
    const { privateKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const jwk = privateKey.export({ format: 'jwk' });
    const kid = crypto.hash('sha256', JSON.stringify({ crv: jwk.crv, kty: jwk.kty, x: jwk.x, y: jwk.y }), 'base64url');
    fs.writeFileSync(path, JSON.stringify({ keys: [{ ...jwk, kid, alg: 'ES256', use: 'sig' }] }, null, 2), { mode: 0o600 });
  }
  const jwks = JSON.parse(fs.readFileSync(path, 'utf8'));
  if (!jwks.keys?.length) throw new Error(`${path}: no keys`);
  return jwks;
}

// ----- clients ------------------------------------------------------------

function certificateJwk(pemPath) {
  const cert = new crypto.X509Certificate(fs.readFileSync(pemPath));
  return { ...cert.publicKey.export({ format: 'jwk' }), x5c: [cert.raw.toString('base64')] };
}

// oidc-provider wants at least one redirect URI for a client of the code
// flow: until it is given its real ones, it has this one, which goes nowhere.
const NO_REDIRECT_URI = 'https://redirect-uri-not-set.invalid/';

// The public part of a client's JWKS (inline, or a file path): a private
// member given by mistake is never registered.
const PRIVATE_JWK_MEMBERS = new Set(['d', 'p', 'q', 'dp', 'dq', 'qi', 'oth', 'k']);

function publicJwks(jwks) {
  const set = typeof jwks === 'string' ? JSON.parse(fs.readFileSync(jwks, 'utf8')) : jwks;
  const keys = set?.keys ?? (set?.kty ? [set] : []);
  if (!keys.length) throw new Error('a private_key_jwt client needs "jwks" with at least one key');
  return {
    keys: keys.map((key) => Object.fromEntries(Object.entries(key).filter(([name]) => !PRIVATE_JWK_MEMBERS.has(name)))),
  };
}

function clientMetadata(spec) {
  const auth = spec.auth ?? 'client_secret_basic';
  const metadata = {
    client_id: spec.client_id,
    token_endpoint_auth_method: auth,
    grant_types: spec.code ? ['authorization_code'] : ['client_credentials'],
    response_types: spec.code ? ['code'] : [],
    redirect_uris: spec.code && !spec.redirect_uris?.length ? [NO_REDIRECT_URI] : (spec.redirect_uris ?? []),
    tls_client_certificate_bound_access_tokens: !!spec.bound,
  };
  if (spec.secret) metadata.client_secret = spec.secret;
  if (auth === 'self_signed_tls_client_auth') {
    metadata.jwks = { keys: (spec.certificates ?? []).map(certificateJwk) };
  }
  if (auth === 'tls_client_auth') metadata.tls_client_auth_subject_dn = spec.subject_dn;
  if (auth === 'private_key_jwt') {
    if (spec.jwks_uri) metadata.jwks_uri = spec.jwks_uri;
    else metadata.jwks = publicJwks(spec.jwks);
  }
  if (spec.dpop) metadata.dpop_bound_access_tokens = true;
  return { ...metadata, ...spec.metadata };
}

const clients = (config.clients ?? []).map(clientMetadata);
const introspectors = new Set((config.clients ?? []).filter((c) => c.introspect).map((c) => c.client_id));

// ----- mutual TLS -----------------------------------------------------------

// The server asks every client for a certificate and accepts any (or none):
// nginx's "ssl_verify_client optional_no_ca". oidc-provider takes the
// certificate as PEM or as a crypto.X509Certificate.
function getCertificate(ctx) {
  const peer = ctx.socket.getPeerCertificate?.(false);
  if (!peer?.raw) return undefined;
  return new crypto.X509Certificate(peer.raw);
}

function normalizeDn(dn) {
  return dn.split(/[\n,]/).map((part) => part.trim()).filter(Boolean).join(',');
}

// ----- resource servers -----------------------------------------------------

const ttl = config.access_token_ttl ?? 600;

function resourceServerInfo(resource) {
  if (resource.startsWith('https://api')) {
    return {
      scope: 'read write',
      audience: resource,
      accessTokenTTL: ttl,
      accessTokenFormat: 'jwt',
      jwt: { sign: { alg: 'ES256' } },
    };
  }
  if (resource.startsWith('https://opaque')) {
    return { scope: 'read write', audience: resource, accessTokenTTL: ttl, accessTokenFormat: 'opaque' };
  }
  throw new errors.InvalidTarget(`unknown resource ${resource}`);
}

// ----- accounts ---------------------------------------------------------------

// Any login name is an account; the development login form takes any password.
async function findAccount(ctx, id) {
  return {
    accountId: id,
    claims: async () => ({
      sub: id,
      name: id.charAt(0).toUpperCase() + id.slice(1),
      preferred_username: id,
      email: `${id}@example.test`,
      email_verified: true,
    }),
  };
}

// ----- the provider ---------------------------------------------------------

function providerFor(issuer) {
  const provider = new Provider(issuer, {
    jwks: loadKeys(config.keys),
    clients,
    findAccount,
    // openid, profile and email come from the claims below. offline_access (config
    // "refresh_tokens") enables the refresh_token grant: refresh tokens to introspect.
    scopes: ['read', 'write', ...(config.refresh_tokens ? ['offline_access'] : [])],
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
    },
    pkce: { required: () => true },
    clientAuthMethods: [
      'client_secret_basic', 'client_secret_post', 'private_key_jwt', 'self_signed_tls_client_auth', 'tls_client_auth',
    ],
    routes: ROUTES,
    clientDefaults: {
      grant_types: ['client_credentials'],
      response_types: [],
      id_token_signed_response_alg: 'ES256',
    },
    enabledJWA: {
      // ID tokens (and everything else) are ES256: the provider needs no RSA
      // key besides the EC signing key.
      idTokenSigningAlgValues: ['ES256'],
    },
    clientBasedCORS: () => false,
    // The provider's only outgoing requests are to a client's jwks_uri, which in
    // these tests is a stack on loopback: its SSRF guard (special-use addresses
    // refused) would refuse exactly that, so this fetch goes without it.
    fetch: (url, { dispatcher, ...options }) => globalThis.fetch(url, options),
    ttl: {
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? ttl,
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? ttl,
    },
    features: {
      // The provider's own login and consent pages, at /interaction/<uid>.
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => introspectors.has(client.clientId) || client.clientId === token.clientId,
      },
      revocation: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => introspectors.has(client.clientId) || client.clientId === token.clientId,
      },
      dPoP: { enabled: true },
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        selfSignedTlsClientAuth: true,
        tlsClientAuth: true,
        getCertificate,
        certificateAuthorized: (ctx) => ctx.socket.authorized === true,
        certificateSubjectMatches: (ctx, property, expected) => {
          if (property !== 'tls_client_auth_subject_dn') return false;
          const cert = getCertificate(ctx);
          return !!cert && normalizeDn(cert.subject) === normalizeDn(expected);
        },
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client, oneOf) => oneOf ?? 'https://api.test',
        getResourceServerInfo: (ctx, resource) => resourceServerInfo(resource),
        // The code flow's access token is for the resource granted (a JWT for
        // https://api.test by default), not an opaque one for userinfo.
        useGrantedResource: () => true,
      },
    },
  });
  provider.proxy = false;

  // JWT access tokens, by jti: the digest of the token issued, and its claims.
  const issuedJwts = new Map();
  const digest = (value) => crypto.hash('sha256', value, 'base64url');

  provider.use(async (ctx, next) => {
    const { path } = ctx;
    if (ctx.method === 'POST' && (path === ROUTES.introspection || path === ROUTES.revocation)
        && ctx.is('application/x-www-form-urlencoded')) {
      // Read the form here and give the provider a JWT as its jti (see the top).
      const chunks = [];
      for await (const chunk of ctx.req.iterator({ destroyOnReturn: false })) chunks.push(chunk);
      const form = querystring.parse(Buffer.concat(chunks).toString('utf8'));
      let jti;
      if (typeof form.token === 'string' && form.token.split('.').length === 3) {
        try {
          ({ jti } = JSON.parse(Buffer.from(form.token.split('.')[1], 'base64url').toString('utf8')));
        } catch {}
        const known = typeof jti === 'string' ? issuedJwts.get(jti) : undefined;
        // An unknown, altered or forged JWT becomes a token that cannot be found.
        form.token = known === digest(form.token) ? jti : `unknown-${crypto.randomUUID()}`;
      }
      ctx.req.body = querystring.stringify(form);
      await next();
      if (jti && ctx.body?.active) ctx.body.jti = jti;
      return;
    }

    await next();

    if (ctx.method === 'POST' && path === ROUTES.token && ctx.status === 200) {
      // ClientCredentials: client_credentials; AccessToken: authorization_code.
      const token = ctx.oidc?.entities?.ClientCredentials ?? ctx.oidc?.entities?.AccessToken;
      const value = ctx.body?.access_token;
      if (token?.format === 'jwt' && typeof value === 'string') {
        const claims = JSON.parse(Buffer.from(value.split('.')[1], 'base64url').toString('utf8'));
        issuedJwts.set(token.jti, digest(value));
        // A plain stored copy of the token (its model's fields but the
        // format), which the provider can introspect and revoke.
        const copy = {};
        for (const key of token.constructor.IN_PAYLOAD) {
          if (key !== 'format' && token[key] !== undefined) copy[key] = token[key];
        }
        await token.constructor.adapter.upsert(token.jti, {
          ...copy,
          iat: claims.iat,
          exp: claims.exp,
          jti: token.jti,
          kind: token.kind,
        }, Math.max(1, claims.exp - Math.floor(Date.now() / 1000)));
      }
    }
  });

  provider.on('server_error', (ctx, err) => console.error('server_error', ctx.method, ctx.path, err));
  return provider;
}

// ----- the HTTPS server -----------------------------------------------------

const tls = config.tls ?? {};
let provider; // the provider, once it exists
let handle; // its request handler

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

// PUT /__clients/<client_id>/redirect_uris: replaces the redirect URIs of a
// configured client, checked as at registration. oidc-provider keeps one
// instance of each configured client and reads its redirectUris on every
// request, so the change holds from the next request on.
async function setRedirectUris(req, res, clientId) {
  let uris;
  try {
    uris = await readJson(req);
  } catch {
    return json(res, 400, { error: 'invalid_request', error_description: 'a JSON array of URIs is expected' });
  }
  if (!Array.isArray(uris) || !uris.every((uri) => typeof uri === 'string')) {
    return json(res, 400, { error: 'invalid_request', error_description: 'a JSON array of URIs is expected' });
  }
  const client = await provider.Client.find(clientId);
  if (!client) return json(res, 404, { error: 'invalid_client', error_description: `no client ${clientId}` });
  const redirectUris = uris.length || !client.responseTypes.length ? uris : [NO_REDIRECT_URI];
  try {
    await provider.Client.validate({ ...client.metadata(), redirect_uris: redirectUris });
  } catch (err) {
    return json(res, 400, { error: err.message, error_description: err.error_description });
  }
  client.redirectUris = redirectUris;
  return json(res, 200, { client_id: clientId, redirect_uris: redirectUris });
}

const server = https.createServer({
  cert: fs.readFileSync(tls.cert),
  key: fs.readFileSync(tls.key),
  ...(tls.client_ca ? { ca: fs.readFileSync(tls.client_ca) } : {}),
  requestCert: true,
  rejectUnauthorized: false,
}, (req, res) => {
  const url = new URL(req.url, 'https://localhost');
  if (url.pathname === '/__stats' && req.method === 'GET') return json(res, 200, stats);
  if (url.pathname === '/__stats/reset' && req.method === 'POST') {
    for (const key of Object.keys(stats)) stats[key] = 0;
    return json(res, 200, stats);
  }
  const admin = url.pathname.match(/^\/__clients\/([^/]+)\/redirect_uris$/);
  if (admin && req.method === 'PUT' && provider) {
    return setRedirectUris(req, res, decodeURIComponent(admin[1])).catch((err) => {
      console.error('redirect_uris', err);
      json(res, 500, { error: 'server_error' });
    });
  }
  if (req.method === 'GET' && url.pathname === ROUTES.jwks) stats.jwks += 1;
  if (req.method === 'POST') {
    if (url.pathname === ROUTES.token) stats.tokens += 1;
    else if (url.pathname === ROUTES.introspection) stats.introspections += 1;
    else if (url.pathname === ROUTES.revocation) stats.revocations += 1;
  }
  if (url.pathname === '/.well-known/oauth-authorization-server') {
    req.url = `/.well-known/openid-configuration${url.search}`;
  }
  if (!handle) return json(res, 503, { error: 'temporarily_unavailable' });
  return handle(req, res);
});
server.keepAliveTimeout = 1000;

function shutdown() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(config.port ?? 0, host, () => {
  const { port } = server.address();
  const issuer = config.issuer ?? `https://${host.includes(':') ? `[${host}]` : host}:${port}`;
  provider = providerFor(issuer);
  handle = provider.callback();
  // Configured clients are checked on first use: check them all now, so that
  // a bad one stops the launcher before READY rather than failing a request.
  Promise.all(clients.map((c) => provider.Client.find(c.client_id))).then(() => {
    process.stdout.write(`READY ${port}\n`);
  }, (err) => {
    console.error('invalid client metadata:', err.message, err.error_description ?? '');
    process.exit(1);
  });
});
