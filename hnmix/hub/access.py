"""Whether a run may push to the Hub, checked before training: repo id, token, network.

Facts of huggingface_hub 2.x found here: its HTTP client (httpx2) has no timeout, so
`HfApi().whoami()` against a server that accepts the connection and never answers hangs for
good (observed > 30 s), while a failed DNS lookup fails at once (0.15 s, no retries), as does
`HF_HUB_OFFLINE` (`OfflineModeIsEnabled`). httpx2's errors are not `OSError`s. The check
therefore runs its network calls in a helper thread and gives up after `timeout_s`.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Optional

import huggingface_hub
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import validate_repo_id

from hnmix.errors import HubError, describe, network_error_types

_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def check_hub_access(api: Any, repo_id: str, *, private: bool, token: Optional[str], timeout_s: float,
                     scrub: Callable[[str], str]) -> str:
    """A valid `user/name` repo id, a token, and a reachable Hub where the repository exists or can
    be created (`api`: an `HfApi`); returns the token. Raises HubError with one line otherwise,
    its text passed through `scrub` wherever it quotes an error."""
    try:
        validate_repo_id(repo_id)
        well_formed = repo_id.count("/") == 1
    except HFValidationError:
        well_formed = False
    if not well_formed:
        raise HubError(f"Hub repo id {repo_id!r} is not valid; give it as user/name or organisation/name "
                       "(letters, digits, '-', '_', '.')")
    try:
        token = token or huggingface_hub.get_token()
    except Exception as error:  # noqa: BLE001 - get_token raises when an opted-in OIDC exchange fails
        raise HubError(f"cannot get a Hugging Face token ({scrub(describe(error))}); "
                       "set HF_TOKEN or run `hf auth login`") from None
    if not token:
        raise HubError("no Hugging Face token to push with; set HF_TOKEN or run `hf auth login`")

    def whoami_and_create_repo() -> None:
        api.whoami()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")

    error = call_with_timeout(whoami_and_create_repo, timeout_s)
    if error is not None:
        raise HubError(explain_access_error(error, repo_id, lambda text: scrub_token(scrub(text), token))) from None
    return token


def call_with_timeout(function: Callable[[], None], timeout_s: float) -> Optional[BaseException]:
    """Run `function` in a daemon thread; the exception it raised, a TimeoutError when it did not
    finish within `timeout_s`, or None. Programming errors are re-raised here."""
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            function()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="hnmix-hub-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return TimeoutError(f"no answer within {timeout_s:g} s")
    error = outcome.get("error")
    if error is not None and not isinstance(error, network_error_types()):
        raise error
    return error


def explain_access_error(error: BaseException, repo_id: str, scrub: Callable[[str], str]) -> str:
    """One line for a failed start-up call, with the way out."""
    where = f"the Hugging Face Hub ({repo_id})"
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot reach {where}: HF_HUB_OFFLINE is set; unset it, or train without pushing to the Hub"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status == 401:
        return "the Hugging Face token is invalid or expired; set a valid HF_TOKEN or run `hf auth login --force`"
    if isinstance(error, HfHubHTTPError) and status == 403:
        return (f"the Hugging Face token may not create or write {repo_id}; use a token with write access "
                "to that namespace, or another repo id")
    return (f"cannot reach {where}: {scrub(describe(error))}; check the network or proxy, "
            "or train without pushing to the Hub")


def scrub_token(text: str, token: Optional[str]) -> str:
    """`text` without `token` (and without anything shaped like a Hugging Face token)."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)


def token_or_none() -> Optional[str]:
    """The token huggingface_hub would use, or None (only to scrub logs; the check reports token
    problems)."""
    try:
        return huggingface_hub.get_token()
    except Exception:  # noqa: BLE001
        return None
