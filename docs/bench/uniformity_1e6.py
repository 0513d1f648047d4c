"""Uniformity on 10^6 rows, D = 128, fp32, forward (no gradient), blockwise: peak RSS of the
full problem's buffers, time of a slice of the anchors extrapolated to all of them."""
import resource, sys, time, math, torch
import csrc_triton as ct
from csrc_triton.positives import row_dot
N, D, ROWS = 1_000_000, 128, int(sys.argv[1]) if len(sys.argv) > 1 else 20480
torch.manual_seed(0)
x = torch.nn.functional.normalize(torch.randn(N, D), dim=1)
t = torch.tensor(2.0)
with torch.no_grad():
    # sanity: the public function on a small slice equals this decomposition
    small = x[:3000]
    ref = ct.uniformity(small, t=2.0)
    sq = row_dot(small, small)
    r = torch.ops.contrastive.lse(small, small, 2 * t, -t * sq, 0, False, None, None, None, False, False, False, "blockwise")[0]
    alt = torch.logsumexp(r - t * sq, 0) - math.log(3000 * 2999)
    assert abs(float(ref - alt)) < 1e-5, (float(ref), float(alt))
    sq = row_dot(x, x)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    row = torch.ops.contrastive.lse(x[:ROWS], x, 2 * t, -t * sq, 0, False, None, None, None, False, False, False, "blockwise")[0]
    el = time.perf_counter() - t0
    part = torch.logsumexp(row - t * sq[:ROWS], 0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(f"N={N} D={D}: {ROWS} anchors x {N} keys in {el:.1f} s; all {N} anchors extrapolated: {el * N / ROWS / 60:.1f} min")
print(f"peak RSS {peak:.3f} GB (before the engine call: {rss0:.3f} GB)")
print(f"partial log-sum-exp over these anchors' pairs: {float(part):.4f}")
