"""Writes the Lightning checkpoints in tests/data/lightning/ (run by hand; Lightning and
OmegaConf are not test dependencies; 2.6.6 and 2.4.0 were used):

    python tests/data/make_lightning.py tests/data/lightning

A small LightningModule (save_hyperparameters, BatchNorm, Adam + StepLR) trained on CPU for
two epochs with ModelCheckpoint, EarlyStopping and LearningRateMonitor; ``plain.ckpt`` has plain
hyperparameters, ``omegaconf.ckpt`` one that is an OmegaConf DictConfig (as Hydra users have).
Each is copied from the run's last.ckpt; ``plain.state_dict.pt`` is the module's own state
dict for comparison.
"""

import os
import shutil
import sys
import tempfile

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset


class Net(L.LightningModule):
    def __init__(self, lr=0.01, hidden=8, cfg=None):
        super().__init__()
        self.save_hyperparameters()
        self.model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(hidden, 1))

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.model(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


def main(root):
    from omegaconf import OmegaConf

    os.makedirs(root, exist_ok=True)
    for name, cfg in (("plain", None), ("omegaconf", OmegaConf.create({"data": {"root": "/data", "bs": 8}}))):
        torch.manual_seed(0)
        dl = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=8)
        net = Net(cfg=cfg)
        with tempfile.TemporaryDirectory() as run:
            from lightning.pytorch.loggers import CSVLogger

            trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(run), enable_progress_bar=False,
                                enable_model_summary=False,
                                callbacks=[ModelCheckpoint(dirpath=run, monitor="val_loss", save_last=True),
                                           EarlyStopping("val_loss"), LearningRateMonitor()])
            trainer.fit(net, dl, dl)
            shutil.copy(os.path.join(run, "last.ckpt"), os.path.join(root, f"{name}.ckpt"))
        if name == "plain":
            torch.save(net.state_dict(), os.path.join(root, "plain.state_dict.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
