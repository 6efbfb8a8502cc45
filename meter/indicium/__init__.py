"""meter.indicium"""
