"""Container identity of a process, from its cgroup path and the runtimes' on-disk state.

``/proc/PID/cgroup`` has one line per cgroup v1 hierarchy (``N:controllers:PATH``) and
``0::PATH`` for the v2 hierarchy (both on a hybrid layout).  Each container runtime names
the cgroup it creates after the container (the table in docs and in the tests):

* Docker ``/docker/<id>``, ``/system.slice/docker-<id>.scope``;
* Podman ``/libpod_parent/libpod-<id>``, ``/machine.slice/libpod-<id>.scope``;
* containerd (Kubernetes) ``.../kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope``;
* CRI-O ``.../crio-<id>.scope`` (``crio-conmon-<id>.scope`` is its monitor, not the payload);
* Kubernetes with the cgroupfs driver ``/kubepods/<qos>/pod<uid>/<id>`` (either CRI runtime:
  which one is told by its on-disk state, see :class:`NameResolver`);
* systemd-nspawn ``/machine.slice/systemd-nspawn@NAME.service``, ``machine-NAME.scope``;
* LXC ``/lxc/NAME``, ``/lxc.payload.NAME``.

Names (container, pod, Kubernetes namespace) are read only from local files, never from a
network API: podman's ``containers.json``, Docker's ``config.v2.json``, the OCI
``config.json`` annotations of containerd and CRI-O, the kubelet's ``/var/log/pods`` and
``/var/log/containers`` layouts.  Every name and path here is untrusted text from the traced
system: whatever shows it to a person escapes it (``textsafe.visible``).
"""

from __future__ import annotations

import enum
import json
import os
import pwd
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from closewait_trace.facts.enrich import PROC, _pids  # one /proc pid listing for every stage
from closewait_trace.errors import UsageError

__all__ = [
    "CgroupLine",
    "ContainerIdentity",
    "ContainerSelection",
    "NameResolver",
    "Pod",
    "Runtime",
    "cgroup_v2_id",
    "identity_from_lines",
    "identity_of_pid",
    "parse_cgroup_path",
    "parse_proc_cgroup",
    "running_identities",
    "select_containers",
]


class Runtime(enum.Enum):
    """Who made the container.  ``CRI`` is a Kubernetes container whose cgroup path does not
    say whether containerd or CRI-O runs it (the cgroupfs driver names both alike)."""

    DOCKER = "docker"
    PODMAN = "podman"
    CONTAINERD = "containerd"
    CRIO = "cri-o"
    CRI = "cri"
    NSPAWN = "systemd-nspawn"
    LXC = "lxc"


@dataclass(frozen=True)
class CgroupLine:
    """One line of ``/proc/PID/cgroup``: hierarchy 0 with no controllers is cgroup v2."""

    hierarchy: int
    controllers: tuple[str, ...]
    path: str

    @property
    def is_v2(self) -> bool:
        return self.hierarchy == 0 and not self.controllers


@dataclass(frozen=True)
class Pod:
    """A Kubernetes pod, as far as the cgroup path and the local files tell.

    ``uid`` is the pod UID in its canonical form (with ``-``; None when only names are
    known), ``qos`` one of ``guaranteed``, ``burstable``, ``besteffort`` (told by the cgroup
    path alone).  Names are None when no local file tells them.
    """

    uid: str | None = None
    qos: str | None = None
    name: str | None = None
    namespace: str | None = None

    @property
    def full_name(self) -> str | None:
        """``namespace/name``, or the name alone when the namespace is not known."""
        if self.name and self.namespace:
            return f"{self.namespace}/{self.name}"
        return self.name

    @property
    def names(self) -> set[str | None]:
        """What a user may call it: its name, ``namespace/name``, its UID."""
        return {self.name, self.full_name, self.uid}

    def filled_from(self, other: Pod | None) -> Pod:
        """This pod with what it does not know taken from ``other`` (the same pod)."""
        if other is None:
            return self
        return Pod(uid=self.uid or other.uid, qos=self.qos or other.qos,
                   name=self.name or other.name, namespace=self.namespace or other.namespace)

    def as_dict(self) -> dict[str, str]:
        """The fields that are known, under their flat JSON keys (``pod_uid``, ...)."""
        return {f"pod_{key}": value for key, value in vars(self).items() if value is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> Pod | None:
        """The inverse of :meth:`as_dict` (other keys ignored); None without any pod key."""
        return _known(cls(uid=d.get("pod_uid"), qos=d.get("pod_qos"), name=d.get("pod_name"),
                          namespace=d.get("pod_namespace")))


def _known(pod: Pod) -> Pod | None:
    """``pod``, or None when nothing of it is known."""
    return pod if pod != Pod() else None


@dataclass(frozen=True)
class ContainerIdentity:
    """Where a process sits: its cgroup path and, inside a container, who made it and names.

    ``container_id`` is the runtime's 64-hex id (None for systemd-nspawn and LXC, which
    name containers instead); ``pod`` the Kubernetes pod it belongs to.  Names are None when
    no local file tells them.
    """

    cgroup: str
    runtime: Runtime | None = None
    container_id: str | None = None
    container_name: str | None = None
    pod: Pod | None = None

    @property
    def in_container(self) -> bool:
        return self.runtime is not None

    @property
    def short_id(self) -> str | None:
        """The 12-character id Docker and Podman print."""
        return self.container_id[:12] if self.container_id else None

    @property
    def label(self) -> str | None:
        """The shortest text naming the container: its name, else its short id."""
        return self.container_name or self.short_id

    def match(self, query: str) -> str | None:
        """How a ``--container`` value names this identity: "name" (the container's name,
        the pod's name, ``namespace/pod`` or pod UID), "id" (a prefix, 3+ characters, of the
        container id), or None."""
        if not self.in_container and self.pod is None:
            return None
        if query in {self.container_name} | (self.pod.names if self.pod else set()):
            return "name"
        cid = self.container_id
        if cid and len(query) >= 3 and cid.startswith(query.lower()):
            return "id"
        return None

    def as_dict(self) -> dict[str, str]:
        """The fields that are known, as JSON-ready text (runtime by its value, the pod's
        fields flat as ``pod_uid``, ``pod_qos``, ``pod_name``, ``pod_namespace``)."""
        out: dict[str, str] = {}
        for key, value in vars(self).items():
            if isinstance(value, Pod):
                out.update(value.as_dict())
            elif value is not None:
                out[key] = value.value if isinstance(value, Runtime) else str(value)
        return out


# --------------------------------------------------------------------------- parsing

_HEX64 = r"[0-9a-f]{64}"
#: A pod UID: a UUID, or the 32-hex config hash of a static pod; ``_`` in systemd slices.
_POD_UID = r"[0-9a-f]{8}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{12}"
_QOS = r"burstable|besteffort"

#: Components that name a container by themselves, with the runtime they mean.
_SCOPED = [
    (re.compile(rf"^docker-({_HEX64})\.scope$"), Runtime.DOCKER),
    (re.compile(rf"^libpod-({_HEX64})(?:\.scope)?$"), Runtime.PODMAN),
    (re.compile(rf"^cri-containerd-({_HEX64})\.scope$"), Runtime.CONTAINERD),
    (re.compile(rf"^crio-({_HEX64})(?:\.scope)?$"), Runtime.CRIO),
]
_BARE_ID = re.compile(rf"^{_HEX64}$")
_POD_CGROUPFS = re.compile(rf"^pod({_POD_UID})$")
_POD_SLICE = re.compile(rf"^(?:.*-)?kubepods(?:-({_QOS}))?-pod({_POD_UID})\.slice$")
_QOS_SLICE = re.compile(rf"^(?:.*-)?kubepods-({_QOS})\.slice$")
_NSPAWN_SERVICE = re.compile(r"^systemd-nspawn@(.+)\.service$")
_MACHINE_SCOPE = re.compile(r"^machine-(.+)\.scope$")
_LXC_PAYLOAD = re.compile(r"^lxc\.payload\.(.+)$")


def parse_proc_cgroup(text: str) -> list[CgroupLine]:
    """The lines of ``/proc/PID/cgroup``; malformed lines are skipped, never an error."""
    out: list[CgroupLine] = []
    for raw in text.splitlines():
        parts = raw.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].startswith("/"):
            continue
        controllers = tuple(c for c in parts[1].split(",") if c)
        out.append(CgroupLine(int(parts[0]), controllers, parts[2]))
    return out


def _unescape_unit(text: str) -> str:
    r"""systemd's unit-name escaping undone (``\x2d`` -> ``-``)."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _pod_of(parts: list[str]) -> Pod | None:
    """The pod (uid and QoS) the components of a kubepods path tell, or None."""
    if not any("kubepods" in p for p in parts):
        return None
    qos: str | None = None
    for part in parts:
        if part in ("burstable", "besteffort"):
            qos = part
        elif (m := _QOS_SLICE.match(part)) is not None:
            qos = m.group(1)
        elif (m := _POD_CGROUPFS.match(part)) is not None:
            return Pod(uid=m.group(1).replace("_", "-"), qos=qos or "guaranteed")
        elif (m := _POD_SLICE.match(part)) is not None:
            return Pod(uid=m.group(2).replace("_", "-"), qos=m.group(1) or qos or "guaranteed")
    return None


def _container_at(parts: list[str], i: int, in_pod: bool) -> tuple[Runtime, str | None,
                                                                     str | None] | None:
    """(runtime, id, name) when component ``i`` names a container, given its parents."""
    part = parts[i]
    parent = parts[i - 1] if i > 0 else ""
    for pattern, runtime in _SCOPED:
        if (m := pattern.match(part)) is not None:
            return runtime, m.group(1), None
    if _BARE_ID.match(part):
        if in_pod and _POD_CGROUPFS.match(parent):
            return Runtime.CRI, part, None
        if parent == "docker":
            return Runtime.DOCKER, part, None
        if parent == "libpod_parent" or (i > 1 and parts[i - 2] == "libpod_parent"):
            return Runtime.PODMAN, part, None  # a container, or one inside a podman pod
    if (m := _NSPAWN_SERVICE.match(part)) is not None:
        return Runtime.NSPAWN, None, _unescape_unit(m.group(1))
    if parent == "machine.slice" and (m := _MACHINE_SCOPE.match(part)) is not None:
        name = _unescape_unit(m.group(1))
        if name.startswith("lxc-"):
            return Runtime.LXC, None, name[4:]
        if not name.startswith("qemu-"):  # libvirt's virtual machines are not containers
            return Runtime.NSPAWN, None, name
    if (m := _LXC_PAYLOAD.match(part)) is not None:
        return Runtime.LXC, None, m.group(1)
    if parent in ("lxc", "lxc.payload") and i == 1:
        return Runtime.LXC, None, part
    return None


def parse_cgroup_path(path: str) -> ContainerIdentity:
    """The identity a cgroup path tells: the innermost component that names a container
    wins (``/docker/A/docker/B`` is B), and a kubepods path gives the pod UID and QoS."""
    parts = [p for p in path.split("/") if p]
    pod = _pod_of(parts)
    for i in range(len(parts) - 1, -1, -1):
        found = _container_at(parts, i, pod is not None)
        if found is not None:
            runtime, cid, name = found
            return ContainerIdentity(cgroup=path, runtime=runtime, container_id=cid,
                                     container_name=name, pod=pod)
    return ContainerIdentity(cgroup=path, pod=pod)


def _line_order(line: CgroupLine) -> int:
    """Which line to trust first: v2, then systemd's named hierarchy, then the others."""
    if line.is_v2:
        return 0
    return 1 if "name=systemd" in line.controllers else 2


def identity_from_lines(lines: Iterable[CgroupLine]) -> ContainerIdentity:
    """The identity of a process from its ``/proc/PID/cgroup`` lines.

    The first line (in the order v2, ``name=systemd``, other v1 controllers) whose path
    names a container decides; otherwise the first path that is not the root, else ``/``.
    (On a hybrid layout a process's v2 path may be ``/`` while its v1 paths name it.)
    """
    ordered = sorted(lines, key=_line_order)
    fallback: ContainerIdentity | None = None
    for line in ordered:
        ident = parse_cgroup_path(line.path)
        if ident.in_container:
            return ident
        if fallback is None and (line.path != "/" or ident.pod):
            fallback = ident
    return fallback or ContainerIdentity(cgroup="/")


def identity_of_pid(pid: int, proc_root: Path = PROC) -> ContainerIdentity | None:
    """The identity of a live process (names not resolved), or None if it is gone."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text(errors="replace")
    except OSError:
        return None
    return identity_from_lines(parse_proc_cgroup(text))


# --------------------------------------------------------------------------- names on disk


def _read_json(path: Path) -> Any:
    """Parsed JSON of a small local file, or None when missing, unreadable or malformed."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(4 << 20)
        return json.loads(data)
    except (OSError, ValueError):
        return None


def _entries(directory: Path) -> list[str]:
    """The names in a runtime's directory; none when it is missing or unreadable."""
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


_K8S_LOG_LINK = re.compile(rf"^([^_]+)_([^_]+)_(.+)-({_HEX64})\.log$")


@dataclass(frozen=True)
class _Names:
    """What a runtime's files tell of a container: its name and its pod."""

    container: str | None = None
    pod: Pod | None = None


def _pod_uid(ident: ContainerIdentity) -> str | None:
    return ident.pod.uid if ident.pod else None


class NameResolver:
    """Container, pod and Kubernetes-namespace names from the runtimes' local files.

    Each root is a parameter so tests can point it at a fixture tree; the defaults are the
    runtimes' own.  Results are cached per container id (a container keeps its name); a
    miss is cached too, until :meth:`forget` (names of containers that have exited).
    """

    def __init__(
        self,
        *,
        podman_storage: Path = Path("/var/lib/containers/storage"),
        podman_runroot: Path = Path("/run/containers/storage"),
        docker_root: Path = Path("/var/lib/docker"),
        containerd_tasks: Path = Path("/run/containerd/io.containerd.runtime.v2.task"),
        kubelet_pod_logs: Path = Path("/var/log/pods"),
        kubelet_container_logs: Path = Path("/var/log/containers"),
        home_of_uid: Callable[[int], str | None] | None = None,
    ) -> None:
        self.podman_storage = podman_storage
        self.podman_runroot = podman_runroot
        self.docker_root = docker_root
        self.containerd_tasks = containerd_tasks
        self.kubelet_pod_logs = kubelet_pod_logs
        self.kubelet_container_logs = kubelet_container_logs
        self._home_of_uid = home_of_uid or _home_of_uid
        self._cache: dict[str, tuple[Runtime | None, _Names]] = {}

    def forget(self, container_id: str) -> None:
        """Drop what is cached about a container (or ``pod:UID``)."""
        self._cache.pop(container_id, None)

    def resolve(self, ident: ContainerIdentity) -> ContainerIdentity:
        """``ident`` with the names (and, for ``Runtime.CRI``, the runtime) filled in where
        a local file tells them; unchanged otherwise."""
        uid = _pod_uid(ident)
        if ident.container_id is None and uid is None:
            return ident
        key = ident.container_id or f"pod:{uid}"
        if key not in self._cache:
            self._cache[key] = self._lookup_all(ident)
        runtime, names = self._cache[key]
        return replace(
            ident,
            runtime=runtime if ident.runtime == Runtime.CRI and runtime else ident.runtime,
            container_name=ident.container_name or names.container,
            pod=ident.pod.filled_from(names.pod) if ident.pod else names.pod,
        )

    def _lookup_all(self, ident: ContainerIdentity) -> tuple[Runtime | None, _Names]:
        runtime, names = self._lookup(ident) if ident.container_id else (None, _Names())
        found = names.pod or Pod()
        uid = _pod_uid(ident) or found.uid
        if uid is not None and found.name is None:
            pod = replace(found, uid=uid).filled_from(self._pod_from_logs(uid))
            names = replace(names, pod=pod)
        return runtime, names

    def _lookup(self, ident: ContainerIdentity) -> tuple[Runtime | None, _Names]:
        """(the runtime when the path left it open, the names) from the runtime's files."""
        cid = ident.container_id
        assert cid is not None
        rt = ident.runtime
        if rt in (Runtime.CONTAINERD, Runtime.CRI):
            names = self._containerd(cid)
            if names is not None:
                return Runtime.CONTAINERD, names
        if rt in (Runtime.PODMAN, Runtime.CRIO, Runtime.CRI):
            runtime, names = self._containers_storage(ident)
            if names is not None:
                return runtime, names
        if rt in (Runtime.DOCKER, Runtime.CRI):
            names = self._docker(cid)
            if names is not None:
                return Runtime.DOCKER, names
        if _pod_uid(ident) is not None:
            return None, self._from_container_logs(cid)
        return None, _Names()

    # -- per runtime ----------------------------------------------------------------

    def _docker(self, cid: str) -> _Names | None:
        data = _read_json(self.docker_root / "containers" / cid / "config.v2.json")
        if not isinstance(data, dict):
            return None
        name = _text(data.get("Name"))
        config = data.get("Config")
        labels = config.get("Labels") if isinstance(config, dict) else None
        k8s = _k8s_labels(labels if isinstance(labels, dict) else {})
        return replace(k8s, container=k8s.container or (name.lstrip("/") if name else None))

    def _containerd(self, cid: str) -> _Names | None:
        for ns in sorted(_entries(self.containerd_tasks)):
            data = _read_json(self.containerd_tasks / ns / cid / "config.json")
            if isinstance(data, dict):
                return _k8s_labels(data.get("annotations") or {})
        return None

    def _storage_roots(self, ident: ContainerIdentity) -> Iterator[Path]:
        yield self.podman_storage
        yield self.podman_runroot
        m = re.search(r"/user@(\d+)\.service/", ident.cgroup)
        if m is not None:  # rootless podman: the user's own storage
            home = self._home_of_uid(int(m.group(1)))
            if home:
                yield Path(home) / ".local/share/containers/storage"

    def _containers_storage(self, ident: ContainerIdentity
                            ) -> tuple[Runtime | None, _Names | None]:
        """Podman's containers.json name, or CRI-O's config.json annotations."""
        cid = ident.container_id
        assert cid is not None
        for root in self._storage_roots(ident):
            config = _read_json(root / "overlay-containers" / cid / "userdata" / "config.json")
            annotations = config.get("annotations") if isinstance(config, dict) else None
            if isinstance(annotations, dict) and "io.kubernetes.pod.name" in annotations:
                return Runtime.CRIO, _k8s_labels(annotations)
            name = _podman_name(root / "overlay-containers" / "containers.json", cid)
            if name is not None:
                return Runtime.PODMAN, _Names(container=name)
        return None, None

    def _pod_from_logs(self, uid: str) -> Pod | None:
        """The pod's names from the kubelet's ``/var/log/pods/<ns>_<pod>_<uid>`` directory."""
        for entry in _entries(self.kubelet_pod_logs):
            parts = entry.split("_")
            if len(parts) == 3 and parts[2] == uid:
                return Pod(uid=uid, name=parts[1], namespace=parts[0])
        return None

    def _from_container_logs(self, cid: str) -> _Names:
        """The kubelet's ``/var/log/containers/<pod>_<ns>_<container>-<id>.log`` link."""
        for entry in _entries(self.kubelet_container_logs):
            m = _K8S_LOG_LINK.match(entry)
            if m is not None and m.group(4) == cid:
                return _Names(container=m.group(3),
                              pod=Pod(name=m.group(1), namespace=m.group(2)))
        return _Names()


def _home_of_uid(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return None


def _k8s_labels(labels: dict[Any, Any]) -> _Names:
    """Names from CRI annotations (containerd, CRI-O) or the kubelet's Docker labels."""
    def pick(*keys: str) -> str | None:
        for key in keys:
            if (value := _text(labels.get(key))) is not None:
                return value
        return None

    pod = Pod(
        uid=pick("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"),
        name=pick("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
        namespace=pick("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"),
    )
    return _Names(
        container=pick("io.kubernetes.cri.container-name", "io.kubernetes.container.name"),
        pod=_known(pod),
    )


def _podman_name(containers_json: Path, cid: str) -> str | None:
    data = _read_json(containers_json)
    if not isinstance(data, list):
        return None
    for entry in data:
        if isinstance(entry, dict) and entry.get("id") == cid:
            names = entry.get("names")
            if isinstance(names, list) and names and isinstance(names[0], str):
                return names[0]
    return None


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class ContainerSelection:
    """The running processes of the containers (or the pod) a user named."""

    query: str
    containers: tuple[ContainerIdentity, ...]
    cgroups: frozenset[str]
    pids: frozenset[int]


def _container_key(ident: ContainerIdentity) -> tuple[str, str]:
    runtime = ident.runtime.value if ident.runtime else ""
    return runtime, ident.container_id or ident.container_name or ident.cgroup


def running_identities(proc_root: Path = PROC, resolver: NameResolver | None = None
                       ) -> dict[int, ContainerIdentity]:
    """pid -> identity (names resolved) of every live process; one parse per distinct
    ``/proc/PID/cgroup`` text."""
    resolver = resolver or NameResolver()
    by_text: dict[str, ContainerIdentity] = {}
    out: dict[int, ContainerIdentity] = {}
    for pid in _pids(proc_root):
        try:
            text = (proc_root / str(pid) / "cgroup").read_text(errors="replace")
        except OSError:
            continue  # exited meanwhile
        ident = by_text.get(text)
        if ident is None:
            ident = resolver.resolve(identity_from_lines(parse_proc_cgroup(text)))
            by_text[text] = ident
        out[pid] = ident
    return out


def select_containers(query: str, *, proc_root: Path = PROC,
                      resolver: NameResolver | None = None) -> ContainerSelection:
    """The running containers a user's ``--container`` value names, with their cgroups and
    pids.

    ``query`` is a container name, a prefix (3+ hex digits) of a container id, a pod name,
    ``namespace/pod`` or a pod UID.  A name matches exactly; an id prefix must name one
    container.  Raises :class:`UsageError` when nothing matches or a prefix is ambiguous.
    """
    query = query.strip()
    if not query:
        raise UsageError("--container needs a container id or name")
    by_name: dict[tuple[str, str], list[tuple[int, ContainerIdentity]]] = {}
    by_id: dict[tuple[str, str], list[tuple[int, ContainerIdentity]]] = {}
    for pid, ident in running_identities(proc_root, resolver).items():
        how = ident.match(query)
        if how is not None:
            target = by_name if how == "name" else by_id
            target.setdefault(_container_key(ident), []).append((pid, ident))
    chosen = by_name or by_id
    if not chosen:
        raise UsageError(f"no running container matches {query!r}")
    if not by_name and len(by_id) > 1:
        ids = ", ".join(sorted(key[1][:12] for key in by_id))
        raise UsageError(f"{query!r} is a prefix of several container ids ({ids})")
    members = [pair for group in chosen.values() for pair in group]
    return ContainerSelection(
        query=query,
        containers=tuple(group[0][1] for group in chosen.values()),
        cgroups=frozenset(ident.cgroup for _pid, ident in members),
        pids=frozenset(pid for pid, _ident in members),
    )


def cgroup_v2_id(path: str, mountinfo: Path = PROC / "self" / "mountinfo") -> int | None:
    """The cgroup v2 id of ``path`` (the inode of its directory in the cgroup2 mount, the
    value ``bpf_get_current_cgroup_id()`` returns in the kernel), or None without cgroup v2
    or when the cgroup is gone."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            mount = left.split(" ")[4]
            try:
                return os.stat(Path(mount) / path.lstrip("/")).st_ino
            except OSError:
                return None
    return None
