"""What of this suite cannot run rootless (pytest as an ordinary user), and why.

The rootless run (``.ci/rootless``) skips these with their reason, under ``--nsbox-strict``
too; everything else must pass there. A test that raises ``RootlessError`` skips by itself
(the plugin does that), so what is listed here is what fails some other way: a test that
itself does what only root may (mount, make a bridge, read another user's files), or that
writes where a rootless box of the host's root cannot.

Keys are a test file's name, or ``file::test`` for one test of it.
"""

from __future__ import annotations

# Why a box of the host's root cannot write its system directories rootless: their files
# belong to the host's root, which is no id in the user's namespace, so root in the box has
# no right over them (README: "Without root").
HOST_ROOT_WRITES = (
    "changes files of a box of the host's root (or checks them exactly), which belong to the host's "
    "root, unmapped in a rootless box's user namespace: it may add files, not change the host's"
)
# A rootless session's bridges and veths live in a network namespace of its own (the box
# helper's), where the test process is not: it reaches boxes through publish=, and its sysfs,
# `ip` and `tc` show the host's interfaces, not the session's.
SESSION_NETNS = (
    "looks at the bridge's interfaces or reaches boxes from the host's network namespace; a rootless "
    "session's bridge lives in a namespace of its own (boxes reach each other; publish= reaches them)"
)
HOST_MOUNTS = "mounts filesystems on the host itself, which only root may"
IDMAPPED = (
    "checks userns=True's idmapped id ranges, which are root's to lease; every rootless box is in "
    "a user namespace already (test_rootless.py)"
)
NO_CGROUPS = (
    "needs box cgroups (freezer, limits), which a rootless run has only in a delegated cgroup v2 subtree"
)
CAPABILITIES = "changes capabilities root holds"

SKIPS: dict[str, str] = {
    # The README's samples and the examples change system files of the host's root.
    "test_readme.py": HOST_ROOT_WRITES,
    "test_examples.py": HOST_ROOT_WRITES,
    "test_isolation.py": HOST_ROOT_WRITES,
    "test_snapshot.py": (
        "checks snapshots of boxes of the host's root file by file (owners, a writer frozen by the "
        "freezer): rootless, host files keep an owner the namespace lacks, and v1 gives no freezer"
    ),
    "test_image_save.py": (
        "saves snapshots of boxes of the host's root and loads them with podman and skopeo from a "
        "private store kept as root"
    ),
    "test_keep.py": HOST_ROOT_WRITES,
    "test_files.py::test_host_path_reaches_the_merged_root": (
        "writes into /root, which is the host root's own (mode 700): not even the box's root may enter it"
    ),
    "test_devices.py": (
        "checks device nodes and setuid programs of a box of the host's root; in a user namespace no "
        "device node can be made, and the host's files are not the box's"
    ),
    "test_hardening.py": (
        "checks what a privileged box of the host may do (mknod, every capability, unmasked /proc), "
        "which a user namespace never allows"
    ),
    "test_images.py": (
        "checks exact owners and device nodes of unpacked layers, which an ordinary user's cache "
        "cannot hold (its files are the user's)"
    ),
    "test_lifecycle.py::test_an_image_on_a_filesystem_mounted_after_the_helper_started": HOST_MOUNTS,
    "test_image_tools.py": "runs podman, skopeo and buildah with a private store kept as root",
    "test_service.py::test_start_service_runs_what_podman_run_runs": (
        "runs podman with a private store kept as root, in a mount namespace only root may make"
    ),
    # Networking: bridged boxes, pairs and clusters work rootless; these look from the host.
    "test_network.py::test_nine_bridged_boxes_all_reach_each_other_and_the_host_reaches_them": SESSION_NETNS,
    "test_network.py::test_a_bridged_box_link_cuts_it_off_from_the_host": SESSION_NETNS,
    "test_network.py::test_stopped_box_gives_back_its_lease_name_and_interface": SESSION_NETNS,
    "test_network.py::test_lease_of_a_killed_owner_is_reclaimed": SESSION_NETNS,
    "test_network_prebuilt.py": SESSION_NETNS,
    "test_cluster.py::test_a_kernel_without_htb_gets_an_error_naming_it_and_no_half_cut": SESSION_NETNS,
    "test_cluster.py::test_the_cuts_are_on_the_receivers_host_end_and_go_with_the_node": SESSION_NETNS,
    "test_cluster.py::test_a_nodes_own_link_is_refused_naming_the_clusters": SESSION_NETNS,
    "test_replicated_kv.py": HOST_ROOT_WRITES,
    "test_network_xdist.py": (
        "checks that xdist workers share one bridge on the host; each rootless worker's bridge is in "
        "a network namespace of its own"
    ),
    "test_gc.py": "makes and removes bridges of its own on the host, which only root may",
    "test_crash.py": (
        "checks what a killed pytest leaves on the host's bridge and in its cgroups; a rootless "
        "session's bridge goes with its network namespace"
    ),
    "test_disks.py": "attaches loop devices, which only root may",
    "test_disk_faults.py": "puts device-mapper targets under loop devices, which only root may",
    "test_userns.py": IDMAPPED,
    "test_plugin_userns.py": IDMAPPED,
    "test_clock.py": "clock= boxes are refused rootless (RootlessError); these check their offsets",
    "test_plugin_clock.py": "clock= boxes are refused rootless (RootlessError); these check their offsets",
    # Unit tests that mount, or change capabilities, on the host.
    "test_overlay.py": HOST_MOUNTS,
    "test_syscalls.py::test_mount_on_a_missing_target_raises_mount_error_naming_it": HOST_MOUNTS,
    "test_syscalls.py::test_mount_of_an_unknown_filesystem_type_hints_at_modprobe": HOST_MOUNTS,
    "test_syscalls.py::test_set_capability_sets_changes_the_inheritable_set": CAPABILITIES,
    "test_syscalls.py::test_drop_from_bounding_set_drops_for_good": CAPABILITIES,
    "test_init_helpers.py": HOST_MOUNTS,
    "test_shell_helpers.py::test_a_pty_pair_from_a_devpts": "opens the host's devpts as root would",
}


# What needs box cgroups, which a rootless run has only in a delegated cgroup v2 subtree (the
# guest's rootless tier has one; a cgroup v1 host never does).
WITHOUT_CGROUPS: dict[str, str] = {
    "test_pause.py": NO_CGROUPS,
    "test_plugin_cluster.py::test_a_failure_report_shows_the_nemesis_timeline": NO_CGROUPS,
    "test_plugin_hooks.py::test_configure_changes_the_box": NO_CGROUPS,
    "test_plugin_report.py::test_a_failed_test_shows_its_box": NO_CGROUPS,
}


def reason_for(path: str, name: str, have_cgroups: bool) -> str | None:
    """Why the test ``name`` of file ``path`` cannot run rootless, or None."""
    base = path.rsplit("/", 1)[-1]
    test = f"{base}::{name.split('[', 1)[0]}"
    found = SKIPS.get(test) or SKIPS.get(base)
    if found is None and not have_cgroups:
        found = WITHOUT_CGROUPS.get(test) or WITHOUT_CGROUPS.get(base)
    return found
