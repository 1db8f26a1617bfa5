"""URIs to fsspec filesystems: plain paths and file:// (local), s3:// (s3fs), anything fsspec knows.

The helpers are thin: they raise the filesystem's own errors (FileNotFoundError, PermissionError);
callers that know what the file means turn those into DatasetError.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dictsweep.errors import InputError

_S3_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}
S3_RETRIES = 10  # attempts per request on transient errors


class StorageError(InputError):
    """Storage that cannot be used as given: a missing bucket, denied access (names the URI)."""


def explain(uri: str, error: BaseException) -> StorageError | None:
    """A missing bucket, denied access or missing credentials as an error naming the URI and what to do;
    None otherwise."""
    text = str(error)
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return StorageError(
            f"{uri}: no storage credentials ({text}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give the machine a role that may read it"
        )
    if isinstance(error, FileNotFoundError) and ("bucket does not exist" in text or "NoSuchBucket" in text):
        bucket = uri.split("://", 1)[-1].split("/", 1)[0]
        return StorageError(f"{uri}: the bucket {bucket!r} does not exist (create it, or correct the URI)")
    if isinstance(error, PermissionError) or any(
        sign in text for sign in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
    ):
        return StorageError(
            f"{uri}: access denied ({text.splitlines()[0][:200] if text else type(error).__name__}); "
            "check the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
            "and the bucket's policy"
        )
    return None


def checked(function):
    """Turn a missing bucket, denied access or missing credentials in `function(uri, ...)` into a StorageError."""

    @functools.wraps(function)
    def call(uri: str, *args, **kwargs):
        try:
            return function(uri, *args, **kwargs)
        except Exception as error:  # OSError, or botocore's own errors (missing credentials)
            problem = explain(uri, error)
            if problem is None:
                raise
            raise problem from None

    return call


def _s3_filesystem() -> fsspec.AbstractFileSystem:
    """An S3FileSystem configured only from the standard AWS environment (cached per endpoint)."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (
        endpoint,
        os.environ.get("AWS_ACCESS_KEY_ID"),
        hash(os.environ.get("AWS_SECRET_ACCESS_KEY")),
        os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_DEFAULT_REGION"),
    )
    if key not in _S3_FILESYSTEMS:
        # credentials, region and profile come from botocore's default chain; listings are not
        # cached so that a manifest written by another process is seen at once; throttling,
        # connection resets and 5xx answers are retried with exponential backoff (botocore standard mode)
        s3 = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            use_listings_cache=False,
            skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": S3_RETRIES, "mode": "standard"}},
        )
        s3.retries = S3_RETRIES  # s3fs's own retry loop (read errors, dropped connections)
        _S3_FILESYSTEMS[key] = s3
    return _S3_FILESYSTEMS[key]


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `uri` and the path to pass to it."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if uri.startswith(("s3://", "s3a://")):
        fs = _s3_filesystem()
        return fs, fs._strip_protocol(uri)
    return fsspec.core.url_to_fs(uri)


def is_local(uri: str) -> bool:
    """Whether `uri` names this machine's file system."""
    return isinstance(resolve(uri)[0], LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended by '/', keeping its scheme: join('s3://b/p', 'x/y') = 's3://b/p/x/y'."""
    out = uri if uri.endswith("://") else uri.rstrip("/") or "/"
    for part in parts:
        part = part.strip("/")
        if part:
            out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


@checked
def check_access(uri: str) -> None:
    """StorageError unless the storage holding `uri` can be used with the credentials at hand: for
    an object store, its bucket exists and answers (nothing need exist under `uri` yet)."""
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        return
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(path)  # raises for missing credentials or denied access
    except FileNotFoundError:
        pass  # nothing there yet
    if not fs.exists(bucket):
        raise FileNotFoundError(f"the bucket does not exist: {bucket}")


@checked
def exists(uri: str) -> bool:
    """Whether a file (object) exists at `uri`."""
    fs, path = resolve(uri)
    return fs.exists(path)


@checked
def read_bytes(uri: str) -> bytes:
    """The whole file at `uri`."""
    fs, path = resolve(uri)
    return fs.cat_file(path)


@checked
def read_bytearray(uri: str, size: int, buffer: bytearray | None = None) -> bytearray | memoryview:
    """The whole file at `uri` in a writable buffer (a local file is read into it in place).

    With `buffer` (reused by a caller that reads file after file), a file of exactly `size` bytes
    comes back as a view of its first `size` bytes: touching fresh memory costs more than a copy.
    """
    fs, path = resolve(uri)
    reuse = buffer is not None and len(buffer) >= size
    if not isinstance(fs, LocalFileSystem):
        # one GET of the whole object: a remote file object would first ask for its size (HEAD),
        # then fetch it block by block (5 MB ranges on S3), one round trip after another
        data = fs.cat_file(path)
        if reuse and len(data) == size:
            buffer[:size] = data
            return memoryview(buffer)[:size]
        return bytearray(data)
    buffer = buffer if reuse else bytearray(size)
    view = memoryview(buffer)
    filled = 0
    with fs.open(path, "rb") as file:
        while filled < size:
            count = file.readinto(view[filled:size])
            if not count:
                break
            filled += count
        rest = file.read() if filled == size else b""
    if filled == size and not rest:
        return buffer if len(buffer) == size else view[:size]
    data = bytearray(view[:filled]) + rest  # not the size the caller expected: it reports that
    view.release()
    return data


@checked
def read_mapped(uri: str, size: int, buffer: bytearray | None = None) -> mmap.mmap | bytearray | memoryview:
    """Like `read_bytearray`, but a local file of `size` bytes comes back mapped copy-on-write: its
    bytes are the page cache's, not copied into the process (a write stays private to it).

    Map only files that are replaced whole, never rewritten in place (dataset shards are): a file
    truncated while mapped faults (SIGBUS) where the lost pages are touched.
    """
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem) and size > 0:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == size:
                return mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
    return read_bytearray(uri, size, buffer)


@checked
def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`; a local file appears under its final name only once complete."""
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        temp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(temp, "wb") as file:
                file.write(data)
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
    else:
        fs.pipe_file(path, bytes(data))  # an object-store PUT is atomic


def read_text(uri: str) -> str:
    """The file at `uri` decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write `text` to `uri` as UTF-8 (atomically for local files)."""
    write_bytes(uri, text.encode("utf-8"))


@checked
def remove(uri: str) -> None:
    """Delete the file at `uri` if it exists."""
    fs, path = resolve(uri)
    if fs.exists(path):
        fs.rm_file(path)


@checked
def list_files(uri: str) -> list[str]:
    """The files under the folder `uri`, as URIs, sorted ([] when there is none)."""
    fs, path = resolve(uri)
    if not fs.exists(path):
        return []
    return sorted(join(uri, os.path.relpath(found, path)) for found in fs.find(path))


def write_files(uri: str, files: dict[str, bytes]) -> None:
    """Write a folder's files in the mapping's order (put the file that marks it complete last)."""
    for name, data in files.items():
        write_bytes(join(uri, name), data)


@checked
def download_folder(uri: str, local_dir: str) -> str:
    """Copy the files under `uri` into `local_dir` (a no-op copy for local folders); returns it."""
    fs, path = resolve(uri)
    os.makedirs(local_dir, exist_ok=True)
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir


@checked
def copy_folder(source: str, destination: str) -> None:
    """Copy the files of one folder (URI) to another, possibly across filesystems."""
    source_fs, source_path = resolve(source)
    files = sorted(source_fs.find(source_path))
    # a folder with a completion marker (cfg.json, manifest.json) gets it last
    files.sort(key=lambda path: os.path.basename(path) in ("cfg.json", "manifest.json"))
    for path in files:
        write_bytes(join(destination, os.path.relpath(path, source_path)), source_fs.cat_file(path))


FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}")


def folder_name(name: object, where: str) -> str:
    """`name` if it is safe as one folder name (letters, digits, `._+=-`, not starting with a dot or
    dash), else an InputError naming `where`: a name from outside (an MLflow tag, index.json) never
    becomes a path separator, `..`, an absolute path or a hidden file."""
    if not isinstance(name, str) or not FOLDER_NAME.fullmatch(name):
        raise InputError(
            f"{where}: the name {name!r} is not a safe folder name (letters, digits and ._+=- only, "
            "starting with a letter or digit); refusing to use it as a path"
        )
    return name
