"""A Hugging Face Hub on disk, put in place of `HfApi`'s network methods: the calls a script makes to the Hub (create
a repo or branch, upload a folder, download a snapshot, delete a branch) act on `<root>/<repo_type>/<owner>/<name>/
<branch>/` and are logged to `<root>/calls.jsonl`, so a test can run a script in a fresh process and read what it would
have uploaded. `upload_folder` applies the same allow/ignore patterns as the real one (`filter_repo_objects`).

With FAKE_HUB_KILL_AT_STEP=N the process is SIGKILLed right after a `last-checkpoint` of step >= N reaches the Hub:
a Job preempted after a checkpoint was pushed."""

from __future__ import annotations

import json
import os
import shutil
import signal
from concurrent.futures import Future
from pathlib import Path

import httpx2
from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects

MAIN = "main"


def repo_folder(root: Path, repo_id: str, repo_type: str | None = None, revision: str | None = None) -> Path:
    return root / (repo_type or "model") / repo_id / (revision or MAIN)


def _log(root: Path, method: str, **arguments: object) -> None:
    with (root / "calls.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps({"method": method, **{k: str(v) for k, v in arguments.items()}}) + "\n")


def not_found(error: type[Exception], message: str) -> Exception:
    """The error `HfApi` raises for a repo or revision the Hub does not have (a 404 response)."""
    return error(message, response=httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co")))


def install(root: str | os.PathLike) -> None:
    """Replace `HfApi`'s network methods with ones acting on `root`, and mark the Hub reachable."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    constants.HF_HUB_OFFLINE = False

    def create_repo(self, repo_id: str, *, repo_type: str | None = None, exist_ok: bool = False, **kwargs) -> RepoUrl:
        _log(root, "create_repo", repo_id=repo_id, repo_type=repo_type, private=kwargs.get("private"))
        folder = repo_folder(root, repo_id, repo_type)
        if folder.is_dir() and not exist_ok:
            raise FileExistsError(repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"{constants.ENDPOINT}/{repo_id}")

    def create_branch(self, repo_id: str, *, branch: str, repo_type: str | None = None, exist_ok: bool = False, **_):
        _log(root, "create_branch", repo_id=repo_id, branch=branch)
        source, target = repo_folder(root, repo_id, repo_type), repo_folder(root, repo_id, repo_type, branch)
        if not source.is_dir():
            raise not_found(RepositoryNotFoundError, repo_id)
        if not target.is_dir():
            shutil.copytree(source, target)

    def delete_branch(self, repo_id: str, *, branch: str, repo_type: str | None = None, **_) -> None:
        _log(root, "delete_branch", repo_id=repo_id, branch=branch)
        shutil.rmtree(repo_folder(root, repo_id, repo_type, branch))

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path: str | os.PathLike,
        path_in_repo: str | None = None,
        commit_message: str | None = None,
        repo_type: str | None = None,
        revision: str | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        run_as_future: bool = False,
        **_,
    ) -> CommitInfo | Future:
        target = repo_folder(root, repo_id, repo_type, revision)
        if not target.is_dir():
            raise not_found(RevisionNotFoundError if target.parent.is_dir() else RepositoryNotFoundError, repo_id)
        source = Path(folder_path)
        files = [path.relative_to(source).as_posix() for path in sorted(source.rglob("*")) if path.is_file()]
        ignore = [*([ignore_patterns] if isinstance(ignore_patterns, str) else ignore_patterns or []), ".git/*"]
        kept = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore))
        for name in kept:
            destination = target / (path_in_repo or "") / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, destination)
        _log(root, "upload_folder", repo_id=repo_id, revision=revision, path_in_repo=path_in_repo, files=kept)
        kill_at = os.environ.get("FAKE_HUB_KILL_AT_STEP")
        if kill_at and path_in_repo == "last-checkpoint":
            state = json.loads((target / path_in_repo / "trainer_state.json").read_text(encoding="utf-8"))
            if state["global_step"] >= int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        commit = CommitInfo(
            commit_url=f"{constants.ENDPOINT}/{repo_id}/commit/{len(kept)}",
            commit_message=commit_message or "",
            commit_description="",
            oid="0" * 40,
        )
        if not run_as_future:
            return commit
        done: Future = Future()
        done.set_result(commit)
        return done

    def snapshot_download(
        self,
        repo_id: str,
        *,
        repo_type: str | None = None,
        revision: str | None = None,
        local_dir: str | os.PathLike | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        **_,
    ) -> str:
        _log(root, "snapshot_download", repo_id=repo_id, repo_type=repo_type, revision=revision, allow=allow_patterns)
        source = repo_folder(root, repo_id, repo_type, revision)
        if not source.is_dir():
            raise not_found(RevisionNotFoundError if source.parent.is_dir() else RepositoryNotFoundError, repo_id)
        target = Path(local_dir) if local_dir else root / "cache" / repo_folder(Path(), repo_id, repo_type, revision)
        files = [path.relative_to(source).as_posix() for path in sorted(source.rglob("*")) if path.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, target / name)
        target.mkdir(parents=True, exist_ok=True)
        return str(target)

    for method in (create_repo, create_branch, delete_branch, upload_folder, snapshot_download):
        setattr(HfApi, method.__name__, method)
