"""Facts about GroupNorm on this torch + GPU that decide layouts and precisions (issue: speed)."""

import torch
import torch.nn.functional as F

x = torch.randn(8, 256, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
gn = torch.nn.GroupNorm(32, 256).cuda()
y = gn(x)
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
print("GroupNorm keeps channels_last on CUDA:", y.is_contiguous(memory_format=torch.channels_last))
with torch.autocast("cuda", dtype=torch.bfloat16):
    z = gn(x.bfloat16())
    c = F.conv2d(x, torch.randn(64, 256, 3, 3, device="cuda"))
print("under bf16 autocast GroupNorm returns", z.dtype, "; conv returns", c.dtype)
for fmt in (torch.contiguous_format, torch.channels_last):
    xx = x.contiguous(memory_format=fmt)
    for _ in range(3):
        gn(xx)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        gn(xx)
    end.record()
    torch.cuda.synchronize()
    print(f"GroupNorm fp32 {'channels_last' if fmt == torch.channels_last else 'NCHW':13} "
          f"{start.elapsed_time(end) / 50 * 1000:.0f} us")
