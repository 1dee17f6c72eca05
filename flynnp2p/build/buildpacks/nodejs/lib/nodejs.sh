# .profile.d/nodejs.sh, written by the nodejs buildpack: sourced before each process.
export PATH="$HOME/node_modules/.bin:$PATH"
export NODE_ENV="${NODE_ENV:-production}"
# V8 reserves about 730 MB of address space as it starts (its code range, heap
# cages, thread stacks). Where the host caps memory with a cgroup (the process
# backend's and the build's limit when the host has a memory controller; Docker's
# limit) no RLIMIT_AS is set and node runs with its JIT. Under the fallback, an
# RLIMIT_AS below 1 GiB, node cannot start at all unless without its JIT (which
# then needs under 256 MB): only then does it get --jitless.
limit=$(ulimit -v)
if [ "$limit" != unlimited ] && [ "$limit" -lt 1048576 ]; then
  export NODE_OPTIONS="--jitless${NODE_OPTIONS:+ $NODE_OPTIONS}"
fi
unset limit
