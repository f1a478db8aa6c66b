from defungi.train.callbacks import EarlyStopping


def test_early_stopping_patience_and_state_round_trip():
    stopper = EarlyStopping(patience_epochs=2)
    assert not stopper.step(0.5, 0)
    assert not stopper.step(0.6, 1)
    assert not stopper.step(0.55, 2)
    clone = EarlyStopping(patience_epochs=2)
    clone.load_state_dict(stopper.state_dict())
    assert clone.step(0.59, 3)
    assert clone.best == 0.6 and clone.best_epoch == 1 and "2 epochs" in clone.reason


def test_min_epochs_delays_stopping():
    stopper = EarlyStopping(patience_epochs=1, min_epochs=4)
    stopper.step(0.5, 0)
    assert not stopper.step(0.4, 1)
    assert stopper.step(0.4, 3)
