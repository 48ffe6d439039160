#pragma once
// grid.sync() of a cooperative launch: every block of the grid runs at once in the emulator (an OS thread
// each), so the barrier is real.
void emu_grid_sync();
namespace cooperative_groups {
struct grid_group {
  void sync() const { emu_grid_sync(); }
};
inline grid_group this_grid() { return grid_group{}; }
}  // namespace cooperative_groups
