import torch, localsgd
from localsgd.algorithms import LocalSGD

info = localsgd.init_distributed()                 # from torchrun's environment; plain python: a world of one
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).to(info.device)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x = torch.randn(4096, 20, device=info.device)      # this rank's shard of the data
y = (x[:, 0] > 0).long()
with localsgd.DataParallel(model, opt, LocalSGD(period=8)) as dp:   # H = 8 local steps, then average
    for step in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()                                  # the algorithm runs in this step's hooks
print(info.rank, dp.stats)                          # syncs, collectives, bytes, communication seconds
