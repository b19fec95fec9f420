"""``decollapse push DIR --repo-id USER/NAME``: upload an exported folder with ``huggingface_hub``.

Everything that can be checked offline is checked before the network is touched: the repo id (the
Hub's own validator, plus the USER/NAME form), that DIR is an export (``auto_map`` in its config, its
bundle files present, a model card that validates, no pickle files). ``dry_run`` stops there and
returns the plan: the files and their sizes. Otherwise ``create_repo(exist_ok=True)``, the branch
when ``revision`` names one, then one ``upload_folder`` commit. A missing token, no network, or a
refusal by the Hub is a PushError with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .export import PICKLE_SUFFIXES


class PushError(ValueError):
    """The push cannot happen (or failed); one line naming the problem."""


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    private: bool
    revision: str | None
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in the repo, bytes)
    url: str | None = None  # the commit's URL once uploaded

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo-id {repo_id!r}: expected USER/NAME (or ORG/NAME)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"--repo-id {repo_id!r} would be refused by the Hub: {str(err).splitlines()[0]}") from None


def plan_push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> PushPlan:
    """Every offline check; the files that would be uploaded."""
    from .card import CardError, validate_card

    folder = Path(folder)
    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise PushError("--revision is empty")
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder}: no config.json, not a model folder")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PushError(f"{folder}/config.json is not readable JSON ({err})") from None
    mapping = config.get("auto_map")
    if not isinstance(mapping, dict) or not mapping:
        raise PushError(f"{folder}: config.json has no auto_map; run `decollapse export {folder} OUT` and push OUT")
    missing = sorted({ref.split(".")[0] + ".py" for ref in mapping.values()} - {p.name for p in folder.glob("*.py")})
    if missing:
        raise PushError(f"{folder}: auto_map names code that is not in the folder ({', '.join(missing)})")
    if not (folder / "README.md").is_file():
        raise PushError(f"{folder}: no README.md model card (`decollapse card {folder}` builds it)")
    try:
        validate_card(folder / "README.md")
    except CardError as err:
        raise PushError(f"{folder}/README.md: {err}") from None
    files = sorted(
        (str(p.relative_to(folder)), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    pickled = [name for name, _ in files if Path(name).suffix in PICKLE_SUFFIXES]
    if pickled:
        raise PushError(f"{folder}: holds pickle files ({', '.join(pickled)}); a decollapse upload carries safetensors only")
    return PushPlan(folder, repo_id, private, revision, files)


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushPlan:
    """Checks (see :func:`plan_push`), then uploads unless ``dry_run``. Returns the plan."""
    plan = plan_push(folder, repo_id, private=private, revision=revision)
    if dry_run:
        return plan

    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(plan.folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload decollapse checkpoint",
            ignore_patterns=[".*", "**/.*"],
        )
    except OfflineModeIsEnabled:
        raise PushError("the Hub is unreachable: offline mode is on (HF_HUB_OFFLINE=1)") from None
    except HfHubHTTPError as err:
        raise PushError(f"the Hub refused the upload: {str(err).splitlines()[0]}") from None
    except _network_errors() as err:
        raise PushError(f"no connection to the Hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    plan.url = getattr(commit, "commit_url", None) or str(commit)
    return plan


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures: huggingface_hub >= 1.0 talks through httpx, older releases through
    requests (whose errors are OSErrors)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)
