"""Progress lines for non-TTY logs: the format, the token count, and a real Lightning fit printing them."""
import io

import torch

from components.training.progress import batch_tokens, format_line, progress_lines


def test_format_line_names_step_loss_rate_and_eta():
    assert format_line("pretrain", 40, 800, 3.21456, 12345.6, 125.0) == \
        "pretrain: step 40/800 loss 3.2146, 12,346 tokens/s, ETA 2m05s"
    assert format_line("dpo", 1, 2, None, 10.0, 0.0) == "dpo: step 1/2, 10 tokens/s, ETA 0m00s"


def test_batch_tokens_of_tensors_and_dicts():
    assert batch_tokens(torch.zeros(4, 16)) == 64
    assert batch_tokens({"input_ids": torch.zeros(2, 8), "lengths": torch.zeros(2)}) == 16
    assert batch_tokens((torch.zeros(3, 5), torch.zeros(3, 5))) == 15


def test_a_real_fit_prints_a_line_per_interval_and_at_the_end():
    import lightning as L

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.w(batch.float()).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    out = io.StringIO()
    data = torch.utils.data.DataLoader(torch.ones(12, 4), batch_size=2)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[progress_lines("toy", interval_s=0.0, stream=out)])
    trainer.fit(Toy(), data)
    lines = out.getvalue().splitlines()
    assert [line.split(" loss ")[0] for line in lines] == ["toy: step 1/3", "toy: step 2/3", "toy: step 3/3"]
    assert all(", 8 tokens/s" not in line and "tokens/s, ETA" in line for line in lines)
