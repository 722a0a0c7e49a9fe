"""The frozen-feature probe (`pretrain.evaluation.probe`): k-NN against a direct computation, the linear probe on
separable data, the chance levels. (The probe's command line: tests/workflows/test_cli.py.)"""
import torch

from pretrain.evaluation.probe import accuracy, chance_levels, chance_text, knn_classify, linear_probe


def test_knn_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 6, generator=g), torch.randn(9, 6, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    got = knn_classify(train, labels, test, num_classes=3, k=5, temperature=0.1, chunk=4)
    for i, x in enumerate(test):
        sims = [float(x @ t / (x.norm() * t.norm())) for t in train]
        nearest = sorted(range(40), key=lambda j: -sims[j])[:5]
        votes = [sum(torch.exp(torch.tensor(sims[j] / 0.1)) for j in nearest if labels[j] == c) for c in range(3)]
        assert got[i] == max(range(3), key=lambda c: float(votes[c])), i


def test_linear_probe_separates_a_linearly_separable_set():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 20, generator=g)
    x = torch.randn(900, 20, generator=g) * 3 + 5  # off-centre and scaled: the BatchNorm must handle it
    y = (x - 5) @ w.T
    labels = y.argmax(1)
    margin = y.topk(2, dim=1).values
    keep = (margin[:, 0] - margin[:, 1]) > 3.0  # a clear margin between the best two classes
    x, labels = x[keep], labels[keep]
    n = len(x) * 2 // 3
    pred = linear_probe(x[:n], labels[:n], x[n:], num_classes=3, epochs=60, batch_size=64, blr=0.5,
                        warmup_epochs=5)
    assert accuracy(pred, labels[n:]) > 0.98
    # LARS scales each step to 0.001 x the weight's norm, so it wants a far larger rate (MAE: lr 6.4 at batch 16384)
    lars = linear_probe(x[:n], labels[:n], x[n:], num_classes=3, epochs=60, batch_size=64, blr=50.0,
                        warmup_epochs=5, optimizer="lars")
    assert accuracy(lars, labels[n:]) > 0.98
    shuffled = linear_probe(x[:n], labels[:n][torch.randperm(n, generator=g)], x[n:], num_classes=3, epochs=20)
    assert accuracy(shuffled, labels[n:]) < 0.7  # it learns the labels, not something about the inputs


def test_chance_is_one_over_the_classes_and_the_val_accuracy_of_the_train_sets_most_frequent_class():
    train, val = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 1, 1, 3, 3])
    chance = chance_levels(train, val, num_classes=4)
    assert chance == {"uniform": 0.25, "majority": 0.2, "majority_class": 0}
    assert chance_levels(torch.tensor([2, 1, 1, 2]), torch.tensor([1, 2, 2]), 3)["majority_class"] == 1  # ties: lowest
    assert chance_text(chance, ["a", "b", "c", "d"]) == "1/4 classes 0.250, majority class 'a' 0.200"
    assert chance_text(chance, []) == "1/4 classes 0.250, majority class 0 0.200"
