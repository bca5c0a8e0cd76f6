// zig build  ->  zig-out/bin/__APP__.wasm (build.sh runs the same compile
// directly and puts __APP__.wasm here).
const std = @import("std");

pub fn build(b: *std.Build) void {
    const target = b.resolveTargetQuery(.{ .cpu_arch = .wasm32, .os_tag = .freestanding });
    const dr = b.createModule(.{ .root_source_file = b.path("devicerunner.zig"), .target = target });
    const root = b.createModule(.{
        .root_source_file = b.path("src/main.zig"),
        .target = target,
        .optimize = .ReleaseSmall,
        .imports = &.{.{ .name = "devicerunner", .module = dr }},
    });
    const exe = b.addExecutable(.{ .name = "__APP__", .root_module = root });
    exe.entry = .disabled; // a library of exports, no _start
    exe.root_module.export_symbol_names = &.{ "dr_init", "dr_tick", "dr_health" };
    exe.stack_size = 64 * 1024; // the WASI default (16 MiB) would not fit the memory limit
    b.installArtifact(exe);
}
