from django.contrib import admin

from .models import Item, Tag


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = ("name", "done", "created_at")
    list_filter = ("done", "tags")
    search_fields = ("name",)


admin.site.register(Tag)
