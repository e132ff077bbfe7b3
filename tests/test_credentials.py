"""Where cloud credentials come from when the SDK chains find none: the 0600 file, the
terminal, or one clear error."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from cloudnbd import credentials
from cloudnbd.backends import gs as gs_backend
from cloudnbd.backends import s3 as s3_backend
from cloudnbd.backends.s3 import S3Credentials
from cloudnbd.errors import CloudnbdError

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.fixture(autouse=True)
def no_cloud_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with no ~/.aws, no gcloud config and no cloudnbd file; no metadata server."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(home / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    return home


class Terminal:
    """stdin as a terminal that answers prompts in order; records what was asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []
        stdin = io.StringIO()
        stdin.isatty = lambda: True  # type: ignore[method-assign]
        monkeypatch.setattr("sys.stdin", stdin)
        monkeypatch.setattr("builtins.input", self.answer)
        monkeypatch.setattr("getpass.getpass", self.answer)

    def answer(self, prompt: str = "") -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)


def test_non_interactive_without_credentials_is_one_clear_error() -> None:
    with pytest.raises(CloudnbdError) as s3:
        s3_backend.find_credentials(None, interactive=False)
    assert "no S3 credentials found" in s3.value.message
    assert "AWS_ACCESS_KEY_ID" in s3.value.message and "--credentials" in s3.value.message
    assert "\n" not in s3.value.message
    with pytest.raises(CloudnbdError) as gs:
        gs_backend.find_key_file(None, interactive=False)
    assert "no Google Cloud credentials found" in gs.value.message
    assert "\n" not in gs.value.message


def test_interactive_is_refused_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("AKIA\nsecret\n"))  # not a TTY
    with pytest.raises(CloudnbdError, match="no S3 credentials found"):
        s3_backend.find_credentials(None, interactive=True)


def test_sdk_chain_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert s3_backend.find_credentials(None, interactive=False) is None  # boto3 decides


def test_asked_credentials_are_saved_0600(no_cloud_setup: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal(monkeypatch, ["AKIAEXAMPLE", SECRET, "y"])
    found = s3_backend.find_credentials(None, interactive=True)
    assert found == S3Credentials("AKIAEXAMPLE", SECRET)
    assert any("0600" in p for p in terminal.prompts)
    path = no_cloud_setup / ".config" / "cloudnbd" / "credentials"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert "[s3]" in text and "aws_access_key_id = AKIAEXAMPLE" in text
    # the next run finds them in the file without asking
    Terminal(monkeypatch, [])
    assert s3_backend.find_credentials(None, interactive=True) == found


def test_declined_credentials_are_not_saved(no_cloud_setup: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    Terminal(monkeypatch, ["AKIAEXAMPLE", SECRET, "n"])
    assert s3_backend.find_credentials(None, interactive=True) == S3Credentials(
        "AKIAEXAMPLE", SECRET)
    assert not (no_cloud_setup / ".config" / "cloudnbd" / "credentials").exists()


def test_saving_gs_keeps_the_s3_section(no_cloud_setup: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = credentials.default_file()
    credentials.save(path, "s3", {"aws_access_key_id": "AKIAEXAMPLE",
                                  "aws_secret_access_key": SECRET})
    key_file = no_cloud_setup / "sa.json"
    key_file.write_text("{}")
    Terminal(monkeypatch, [str(key_file), "yes"])
    assert gs_backend.find_key_file(None, interactive=True) == key_file
    assert s3_backend.find_credentials(path, interactive=False) == S3Credentials(
        "AKIAEXAMPLE", SECRET)
    assert gs_backend.find_key_file(path, interactive=False) == key_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "credentials"
    path.write_text(f"[s3]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = {SECRET}\n")
    path.chmod(mode)
    with pytest.raises(CloudnbdError) as info:
        s3_backend.find_credentials(path, interactive=False)
    assert info.value.message == (f"credentials file {path} is accessible by others (mode "
                                  f"{mode:04o}); run: chmod 600 {path}")


def test_the_default_file_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    path = credentials.default_file()
    credentials.save(path, "s3", {"aws_access_key_id": "AKIAEXAMPLE",
                                  "aws_secret_access_key": SECRET})
    path.chmod(0o644)
    with pytest.raises(CloudnbdError, match="accessible by others"):
        s3_backend.find_credentials(None, interactive=False)


def test_incomplete_file_names_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text("[s3]\naws_access_key_id = AKIAEXAMPLE\n")
    path.chmod(0o600)
    with pytest.raises(CloudnbdError, match=r"\[s3\] has no aws_secret_access_key"):
        s3_backend.find_credentials(path, interactive=False)
    with pytest.raises(CloudnbdError, match=r"has no \[gs\] section"):
        gs_backend.find_key_file(path, interactive=False)


def test_secrets_stay_out_of_reprs_and_errors(tmp_path: Path) -> None:
    found = S3Credentials("AKIAEXAMPLE", SECRET)
    assert SECRET not in repr(found) and SECRET not in str(found)
    path = tmp_path / "credentials"
    path.write_text(f"[s3]\naws_secret_access_key = {SECRET}\n")
    path.chmod(0o600)
    with pytest.raises(CloudnbdError) as info:
        s3_backend.find_credentials(path, interactive=False)
    assert SECRET not in info.value.message


def test_emulator_needs_no_gcs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    assert gs_backend.find_key_file(None, interactive=False) is None
