//! Reading the facts of a process from /proc: cgroup v2 path and id, netns, addresses.
