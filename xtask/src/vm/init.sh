#!/bin/busybox sh
# PID 1 of a ctrace test VM (see xtask/src/vm.rs). Sets up the little a
# kernel needs to run ctrace's end-to-end suite, runs it once per strategy
# and powers off. Everything it prints goes to the serial console, where the
# host reads the CTRACE-VM-* markers. No `set -e`: a failing step is
# reported and the rest still runs, so one problem does not hide the others.
bb=/bin/busybox

# No /dev/console node in the archive (building it would need mknod), so
# the kernel may have started us without one: mount devtmpfs, then reopen.
$bb mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
$bb mount -t proc proc /proc
# --install finds its own path through /proc/self/exe.
$bb --install -s /bin
export PATH=/bin HOME=/ TERM=dumb

mount -t sysfs sys /sys
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
# ctrace reads the kfree_skb record layout from tracefs; debugfs and bpffs
# are what a distribution mounts too.
mount -t tracefs tracefs /sys/kernel/tracing || echo "CTRACE-VM-NOTE tracefs could not be mounted"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
# A kubelet's pods live in cgroups: the pod tests make theirs here.
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || echo "CTRACE-VM-NOTE no cgroup v2: the pod tests skip"
ip link set lo up

echo "CTRACE-VM-KERNEL release=$(uname -r) machine=$(uname -m) cpus=$(grep -c ^processor /proc/cpuinfo) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"

while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "CTRACE-VM-NOTE insmod $m failed"
done </etc/ctrace-vm/modules

# Parameters from the host, as ctrace.* words on the kernel command line.
strategies=auto
run_timeout=900
ct_max=
filter=
show=
for w in $(cat /proc/cmdline); do
    case "$w" in
        ctrace.strategies=*) strategies=$(echo "${w#*=}" | tr , ' ') ;;
        ctrace.run_timeout=*) run_timeout=${w#*=} ;;
        ctrace.ct_max=*) ct_max=${w#*=} ;;
        ctrace.filter=*) filter=${w#*=} ;;
        ctrace.flood=*) export CTRACE_TEST_FLOOD=${w#*=} ;;
        ctrace.show_output=1) show=--show-output ;;
        ctrace.log=*) export RUST_LOG=${w#*=} ;;
    esac
done

max=/proc/sys/net/netfilter/nf_conntrack_max
if [ -n "$ct_max" ]; then
    echo "$ct_max" >$max || echo "CTRACE-VM-NOTE could not set nf_conntrack_max"
fi
echo "CTRACE-VM-CONNTRACK max=$(cat $max 2>/dev/null || echo none)"

# What decides which hook strategies can work here, as facts for the report:
# BTF (fentry/fexit, CO-RE), conntrack's procfs files, whether ctnetlink is
# loaded, tracefs, the kprobe PMU, perf's event sources, TCX, the modules.
btf=absent
[ -d /sys/kernel/btf ] && btf="present($(ls /sys/kernel/btf | wc -l)-files)"
ctproc=absent
[ -e /proc/net/nf_conntrack ] && ctproc=present
ctnl=not-loaded
if grep -q '^nf_conntrack_netlink ' /proc/modules 2>/dev/null; then
    ctnl=loaded
elif [ -d /sys/module/nf_conntrack_netlink ]; then
    ctnl=built-in
fi
tracefs=absent
grep -q ' tracefs ' /proc/mounts && tracefs=mounted
kprobe=absent
[ -d /sys/bus/event_source/devices/kprobe ] && kprobe=present
pmus=$(ls /sys/bus/event_source/devices 2>/dev/null | tr '\n' , | sed 's/,$//')
mods=$(cut -d' ' -f1 /proc/modules 2>/dev/null | tr '\n' , | sed 's/,$//')
# TCX links (fd-scoped tc attachment, 6.6+): kernel/bpf/tcx.c is built in.
tcx=absent
grep -q ' tcx_link_attach$' /proc/kallsyms 2>/dev/null && tcx=present
echo "CTRACE-VM-FACTS btf=$btf proc_nf_conntrack=$ctproc nf_conntrack_netlink=$ctnl tracefs=$tracefs kprobe_pmu=$kprobe perf_pmus=${pmus:-none} tcx=$tcx modules=${mods:-none}"

# ctrace as its OpenWrt package installs it.
ctrace=/usr/sbin/ctrace
echo "CTRACE-VM-PROBE-BEGIN"
$ctrace probe
rc=$?
echo "CTRACE-VM-PROBE-END exit=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"

for pass in $strategies; do
    echo "CTRACE-VM-BEGIN strategy=$pass"
    start=$(date +%s)
    # `tc=tc::`: a pass of only some tests (unless the host gave a filter).
    s=${pass%%=*}
    f=$filter
    case "$pass" in *=*) f=${filter:-${pass#*=}} ;; esac
    # --report-time (unstable: RUSTC_BOOTSTRAP) puts each test's time in
    # the console log, which is what the matrix's cost is made of.
    CTRACE_BIN=$ctrace CTRACE_TEST_STRATEGY=$s RUSTC_BOOTSTRAP=1 \
        /bin/e2e --test-threads=1 --color never \
        -Zunstable-options --report-time $show $f &
    run=$!
    # A watchdog kills a hung run so the next strategy still runs.
    (sleep "$run_timeout" && kill -KILL "$run" 2>/dev/null) &
    watchdog=$!
    wait "$run"
    rc=$?
    kill "$watchdog" 2>/dev/null
    echo "CTRACE-VM-RESULT strategy=$pass exit=$rc secs=$(($(date +%s) - start))"
done

echo "CTRACE-VM-DONE"
sync
# A reboot, which qemu's -no-reboot turns into its exit: kernels without a
# power-off driver (x86 without ACPI, malta without the PIIX4's) would
# only halt, and qemu would keep running until the timeout.
reboot -f
