/*
 * qacc instruction counter: a TCG plugin for QEMU 7.2 (plugin API version 1), user or system mode.
 *
 *   qemu-aarch64 -plugin libinsn_count.so,out=counts.txt,marker=0x400b2c prog
 *
 * Counts every executed guest instruction with one inline add per translation block (the number
 * of instructions in the block, added when the block starts, as QEMU's tests/plugin/bb.c does).
 *
 * marker=ADDR (hex with 0x, or decimal): the entry of the test binary's `noinline` function
 * `void qacc_mark(int id)`. Each time the guest executes the instruction at ADDR, the number of
 * instructions executed before it is recorded. Plugins of this QEMU cannot read registers, so the
 * id is not seen: snapshots are recorded in execution order. Bit 0 of ADDR is ignored (Thumb
 * function symbols have it set).
 *
 * out=PATH: at exit, write "total N" and then one "mark N" line per snapshot to PATH. Without
 * out=, the same lines go to QEMU's log (-d plugin).
 *
 * A block that is left early by an exception still counts all of its instructions; test code
 * does not take exceptions between markers, and the count is deterministic either way.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t insn_count;

static int have_marker;
static uint64_t marker_addr;

static uint64_t *snapshots;
static size_t n_snapshots;
static size_t cap_snapshots;
static int snapshots_overflowed;

static const char *out_path;

static void record_snapshot(uint64_t value)
{
    if (n_snapshots == cap_snapshots) {
        size_t cap = cap_snapshots ? 2 * cap_snapshots : 1024;
        uint64_t *grown = realloc(snapshots, cap * sizeof *grown);
        if (grown == NULL) {
            snapshots_overflowed = 1;
            return;
        }
        snapshots = grown;
        cap_snapshots = cap;
    }
    snapshots[n_snapshots++] = value;
}

/* udata: instructions of this block from the marker to the block's end, already counted. */
static void on_marker(unsigned int vcpu_index, void *udata)
{
    (void)vcpu_index;
    record_snapshot(insn_count - (uint64_t)(uintptr_t)udata);
}

static void on_tb_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    size_t i;

    (void)id;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count, n);
    if (!have_marker) {
        return;
    }
    for (i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        if ((qemu_plugin_insn_vaddr(insn) | 1u) == (marker_addr | 1u)) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, QEMU_PLUGIN_CB_NO_REGS,
                                                   (void *)(uintptr_t)(n - i));
        }
    }
}

static void write_report(FILE *f)
{
    size_t i;

    fprintf(f, "total %" PRIu64 "\n", insn_count);
    for (i = 0; i < n_snapshots; i++) {
        fprintf(f, "mark %" PRIu64 "\n", snapshots[i]);
    }
    if (snapshots_overflowed) {
        fprintf(f, "error out of memory for snapshots\n");
    }
}

static void on_plugin_exit(qemu_plugin_id_t id, void *p)
{
    (void)id;
    (void)p;
    if (out_path != NULL) {
        FILE *f = fopen(out_path, "w");
        if (f == NULL) {
            fprintf(stderr, "insn_count: cannot write %s: %s\n", out_path, strerror(errno));
        } else {
            write_report(f);
            if (fclose(f) != 0) {
                fprintf(stderr, "insn_count: cannot write %s: %s\n", out_path, strerror(errno));
            }
        }
    } else {
        char line[64];
        size_t i;
        snprintf(line, sizeof line, "total %" PRIu64 "\n", insn_count);
        qemu_plugin_outs(line);
        for (i = 0; i < n_snapshots; i++) {
            snprintf(line, sizeof line, "mark %" PRIu64 "\n", snapshots[i]);
            qemu_plugin_outs(line);
        }
    }
    free(snapshots);
    snapshots = NULL;
    n_snapshots = 0;
    cap_snapshots = 0;
}

static int parse_address(const char *text, uint64_t *value)
{
    char *end = NULL;
    unsigned long long v;

    errno = 0;
    v = strtoull(text, &end, 0);
    if (errno != 0 || end == text || *end != '\0') {
        return 0;
    }
    *value = (uint64_t)v;
    return 1;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    int i;

    (void)info;
    for (i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "out=", 4) == 0 && arg[4] != '\0') {
            out_path = arg + 4;
        } else if (strncmp(arg, "marker=", 7) == 0) {
            if (!parse_address(arg + 7, &marker_addr)) {
                fprintf(stderr, "insn_count: bad marker address: %s\n", arg);
                return -1;
            }
            have_marker = 1;
        } else {
            fprintf(stderr, "insn_count: unknown argument %s (expected out=PATH, marker=0xADDR)\n",
                    arg);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_translate);
    qemu_plugin_register_atexit_cb(id, on_plugin_exit, NULL);
    return 0;
}
