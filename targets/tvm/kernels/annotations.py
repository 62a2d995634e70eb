"""Annotations a kernel leaves on its blocks for the schedule that picks it up (kernels sit below
schedules: the schedule imports the names from here, never the other way)."""

#: block annotation of a flat conv's reduction (blocked.conv2d_blocked_flat) with padded rows:
#: [OW, OH, H, stride, dilation, top pad] of its rows, from which `schedules.tiles.row_tile_ranges`
#: tells the pixel tiles whose window row of each kernel row lies inside the input
FLAT_ROWS = "graphopt.flat_rows"

__all__ = ["FLAT_ROWS"]
