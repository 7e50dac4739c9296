"""Who a client is: JWT verification, and the identity the permission rules see.

PyJWT does the cryptography and the standard claim checks (``exp``, ``nbf``, ``aud``,
``iss``); this module chooses the algorithms from the key given (a shared secret for
HS256, a PEM public key for RS256/ES256) and turns a token into an :class:`Identity`.
No I/O beyond reading the key file once at start-up.

A token must carry ``exp`` unless the authenticator is built with ``require_exp=False``:
a token that never expires stays usable for as long as the key is, however it leaks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from fanroute.errors import AuthError, ConfigError

_LEEWAY = 5.0  # seconds of clock skew tolerated on exp/nbf


@dataclass(frozen=True)
class Identity:
    """A connection's identity: anonymous, a token's subject, or the server API."""

    subject: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    expires: float | None = None
    api: bool = False

    @property
    def authenticated(self) -> bool:
        return self.subject is not None or self.api


ANONYMOUS = Identity()
API = Identity(api=True)


@dataclass
class Authenticator:
    """Verifies tokens against the configured key, audience, issuer and expiry rules."""

    secret: str | None = None  # HS256
    public_key: str | None = None  # PEM, RS256 or ES256
    audience: str | None = None
    issuer: str | None = None
    allow_anonymous: bool = True
    api_key: str | None = None
    # Off only for issuers that cannot set exp; such tokens are then valid until the
    # key changes, and the gateway's expiry timer never closes their connections.
    require_exp: bool = True

    @classmethod
    def from_settings(
        cls,
        *,
        secret: str | None,
        public_key_file: str | None,
        audience: str | None,
        issuer: str | None,
        allow_anonymous: bool,
        api_key: str | None,
        require_exp: bool = True,
    ) -> Authenticator:
        public_key = os.environ.get("FANROUTE_JWT_PUBLIC_KEY") or None
        if public_key_file:
            try:
                public_key = Path(public_key_file).read_text()
            except OSError as exc:
                raise ConfigError(f"--jwt-public-key-file {public_key_file} cannot be read: {exc.strerror}") from None
        if public_key is not None and "PUBLIC KEY" not in public_key:
            raise ConfigError("the JWT public key is not a PEM public key (-----BEGIN PUBLIC KEY-----)")
        return cls(
            secret or None, public_key, audience or None, issuer or None, allow_anonymous, api_key or None, require_exp
        )

    @property
    def tokens_enabled(self) -> bool:
        return self.secret is not None or self.public_key is not None

    def verify(self, token: str) -> Identity:
        if not self.tokens_enabled:
            raise AuthError("this gateway accepts no tokens (no JWT key configured)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg == "HS256" and self.secret is not None:
            key: Any = self.secret
        elif alg in ("RS256", "ES256") and self.public_key is not None:
            key = self.public_key
        else:
            raise AuthError(f"token algorithm {alg!r} is not accepted here")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=_LEEWAY,
                options={"require": ["sub", "exp"] if self.require_exp else ["sub"], "verify_aud": self.audience is not None},
            )
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "exp":
                raise AuthError("token has no exp claim: this gateway accepts only tokens that expire") from None
            raise AuthError(f"invalid token: {exc}") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("token subject must be a non-empty string")
        exp = claims.get("exp")
        return Identity(sub, claims, float(exp) if isinstance(exp, (int, float)) else None)

    def check_api_key(self, key: str | None) -> bool:
        import hmac

        return self.api_key is not None and key is not None and hmac.compare_digest(key, self.api_key)
